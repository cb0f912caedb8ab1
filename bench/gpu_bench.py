"""GPU benchmark: fused small_fc_lopt step (fp32 and TF32) vs the pure-JAX reference vs
optax.adamw, on a ViT-B/16-shaped pytree (~86M parameters) and one 1e8-parameter tensor.

Protocol: inputs built once on the device; each variant is one jitted step
(update + apply_updates) with params and state donated; warm-up calls, then N timed
calls each ended by block_until_ready; the median is reported with params/s and the
effective bandwidth of the minimum traffic (lopt: 44 B/param, adamw: 28 B/param).

    python bench/gpu_bench.py --out results.json [--repeats 20] [--hidden 32]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import lopt_ext  # noqa: E402
from lopt_ext import _ffi, timing  # noqa: E402


def vit_b16_shapes():
    """Parameter shapes of ViT-B/16 (ImageNet head), flax-style per-head attention."""
    d, heads, hd, mlp, layers = 768, 12, 64, 3072, 12
    shapes = {"embedding": {"kernel": (16, 16, 3, d), "bias": (d,)},
              "cls": (1, 1, d), "pos_embedding": (1, 197, d),
              "encoder_norm": {"scale": (d,), "bias": (d,)},
              "head": {"kernel": (d, 1000), "bias": (1000,)}}
    for i in range(layers):
        shapes[f"block{i:02d}"] = {
            "ln1": {"scale": (d,), "bias": (d,)},
            "ln2": {"scale": (d,), "bias": (d,)},
            "query": {"kernel": (d, heads, hd), "bias": (heads, hd)},
            "key": {"kernel": (d, heads, hd), "bias": (heads, hd)},
            "value": {"kernel": (d, heads, hd), "bias": (heads, hd)},
            "out": {"kernel": (heads, hd, d), "bias": (d,)},
            "mlp1": {"kernel": (d, mlp), "bias": (mlp,)},
            "mlp2": {"kernel": (mlp, d), "bias": (d,)},
        }
    return shapes


def make_tree(shapes, seed):
    leaves, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    arrays = [0.02 * jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(treedef, arrays)


def count(tree):
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def time_variant(tx, params, grads, repeats, warmup):
    state = tx.init(params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    f = jax.jit(step, donate_argnums=(0, 1))
    params = jax.tree.map(jnp.copy, params)
    t0 = time.perf_counter()
    params, state = f(params, state, grads)
    jax.block_until_ready((params, state))
    compile_s = time.perf_counter() - t0
    carry = [params, state]

    def run():
        carry[:] = jax.block_until_ready(f(*carry, grads))

    times = timing.time_calls(run, rounds=repeats, warmup=warmup)
    del params, state
    carry.clear()
    return float(np.median(times)), float(np.min(times)), compile_s


def git_commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except Exception:
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--workloads", default="vit_b16,dense_1e8")
    ap.add_argument("--variants", default="adamw,fused_tf32,fused_fp32,reference")
    args = ap.parse_args()

    dev = jax.devices()[0]
    cfg = lopt_ext.SmallFcLOpt(hidden_size=args.hidden)
    theta = cfg.init_theta(jax.random.PRNGKey(0))
    result = {"device": str(dev), "device_kind": getattr(dev, "device_kind", None),
              "platform": dev.platform, "jax": jax.__version__, "python": platform.python_version(),
              "git_commit": git_commit(), "hidden_size": args.hidden, "repeats": args.repeats,
              "protocol": "jit(update+apply_updates), donated params/state, median of repeats",
              "workloads": {}}
    try:
        mod = _ffi._cuda_module()
        result["cuda_runtime_version"] = mod.cuda_runtime_version()
        result["tf32_uses_tensor_cores"] = bool(mod.uses_tensor_cores(
            args.hidden, cfg.hidden_layers, *cfg.num_decays, mod.PRECISION_TF32))
    except Exception as e:  # recorded, the run goes on (fused variants will fail loudly)
        result["cuda_module_error"] = repr(e)

    workloads = {"vit_b16": vit_b16_shapes, "dense_1e8": lambda: {"w": (10000, 10000)},
                 "smoke": lambda: {"w": (64, 48), "b": (48,), "t": (3, 4, 5)}}  # CPU smoke test
    for wname in args.workloads.split(","):
        shapes = workloads[wname]()
        params = make_tree(shapes, 1)
        grads = make_tree(shapes, 2)
        n = count(params)
        entry = {"params": n, "leaves": len(jax.tree.leaves(params)), "variants": {}}
        result["workloads"][wname] = entry
        print(f"== {wname}: {n / 1e6:.1f}M parameters in {entry['leaves']} leaves", flush=True)
        for vname in args.variants.split(","):
            try:
                if vname == "adamw":
                    tx, bytes_pp = optax.adamw(1e-3), 28
                elif vname.startswith("fused"):
                    _ffi.set_cuda_precision(vname.split("_")[1])
                    tx, bytes_pp = cfg.transform(theta, impl="fused"), 44
                else:
                    tx, bytes_pp = cfg.transform(theta, impl="reference"), 44
                med, best, comp = time_variant(tx, params, grads, args.repeats, args.warmup)
                v = {"median_ms": med * 1e3, "min_ms": best * 1e3, "compile_s": comp,
                     "params_per_s": n / med, "effective_GBps": n * bytes_pp / med / 1e9,
                     "mlp_GFLOPs": (n * 2 * (28 * args.hidden + (cfg.hidden_layers - 1)
                                             * args.hidden ** 2 + 2 * args.hidden) / med / 1e9
                                    if vname != "adamw" else None)}
            except Exception as e:
                v = {"error": repr(e), "traceback": traceback.format_exc(limit=3)}
            entry["variants"][vname] = v
            base = entry["variants"].get("adamw", {}).get("median_ms")
            if base and "median_ms" in v:
                v["x_adamw"] = v["median_ms"] / base
            print(f"   {vname:12s} {json.dumps(v)[:200]}", flush=True)
            with open(args.out, "w") as f:  # written after every variant (time limits)
                json.dump(result, f, indent=2)
        del params, grads
    _ffi.set_cuda_precision("fp32")
    print(json.dumps({w: {k: v.get("x_adamw") for k, v in e["variants"].items()}
                      for w, e in result["workloads"].items()}, indent=1))


if __name__ == "__main__":
    main()

"""Step time and per-device memory of small_fc_lopt on 1 device vs N host CPU devices.

    python examples/sharded_bench.py --devices 2 --params 1e7 [--hidden 32] [--json out.json]

Sets XLA_FLAGS=--xla_force_host_platform_device_count=N before jax starts (each "device" is
an XLA CPU client sharing this machine's cores). Measures, for a model of ~--params float32
parameters (square-ish matrices plus biases):
- single: lopt_ext.fused_update on one device (the one-call fused kernel);
- fsdp:   lopt_ext.sharded.sharded_update with every matrix sharded along its largest axis
          over all N devices (two-stage statistics + apply kernel);
- dp:     data-parallel: replicated params, the fused kernel on every device's full copy;
and reports median step time (jit, donated buffers, block_until_ready), the optimizer-state
bytes held per device, and XLA's compiled temp/argument bytes per device.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--params", type=float, default=1e7)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    import lopt_ext
    from lopt_ext import sharded

    n = args.devices
    cols = 1024
    rows = int(args.params) // (4 * cols)
    rows -= rows % n
    shapes = {f"w{i}": (rows, cols) for i in range(4)} | {f"b{i}": (cols,) for i in range(4)}
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    grads = {k: (1e-2 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    total = sum(int(np.prod(s)) for s in shapes.values())
    cfg = lopt_ext.SmallFcLOpt(hidden_size=args.hidden)
    theta = cfg.init_theta(jax.random.PRNGKey(0))
    mesh = jax.make_mesh((n,), ("fsdp",))
    specs = {k: (P("fsdp", None) if len(s) == 2 else P()) for k, s in shapes.items()}
    rep = {k: P() for k in shapes}

    def state_bytes_on_device0(state):
        dev = jax.devices()[0]
        b = 0
        for leaf in jax.tree_util.tree_leaves(state):
            for sh in leaf.addressable_shards:
                if sh.device == dev:
                    b += sh.data.nbytes
        return b

    def bench(name, fn, state, p, g):
        compiled = fn.lower(state, p, g).compile()
        mem = compiled.memory_analysis()
        p, state = fn(state, p, g)
        jax.block_until_ready(p)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            p, state = fn(state, p, g)
            jax.block_until_ready((p, state))
            times.append(time.perf_counter() - t0)
        row = {"mode": name, "devices": n if name != "single" else 1,
               "step_ms_median": 1e3 * float(np.median(times)), "step_ms_min": 1e3 * float(np.min(times)),
               "state_bytes_device0": state_bytes_on_device0(state),
               "temp_bytes_per_device": getattr(mem, "temp_size_in_bytes", None),
               "argument_bytes_per_device": getattr(mem, "argument_size_in_bytes", None)}
        print(json.dumps(row), flush=True)
        return row

    rows_out = []
    # single device: everything committed to device 0
    d0 = jax.devices()[0]
    p1 = jax.device_put(params, d0)
    g1 = jax.device_put(grads, d0)
    s1 = jax.device_put(lopt_ext.init_state(cfg, params), d0)
    single = jax.jit(lambda s, p, g: lopt_ext.fused_update(cfg, theta, s, p, g), donate_argnums=(0, 1))
    rows_out.append(bench("single", single, s1, p1, g1))
    del p1, s1, g1

    put = lambda tree, sp: {k: jax.device_put(v, NamedSharding(mesh, sp[k])) for k, v in tree.items()}
    # FSDP
    pf, gf = put(params, specs), put(grads, specs)
    sf = sharded.init_sharded_state(cfg, params, specs, mesh)
    fsdp = jax.jit(lambda s, p, g: sharded.sharded_update(cfg, theta, s, p, g, mesh=mesh, param_specs=specs),
                   donate_argnums=(0, 1))
    rows_out.append(bench("fsdp", fsdp, sf, pf, gf))
    del pf, gf, sf
    # data-parallel: replicated params and state (gradients already averaged)
    pr, gr = put(params, rep), put(grads, rep)
    sr = sharded.init_sharded_state(cfg, params, rep, mesh)
    dp = jax.jit(lambda s, p, g: sharded.sharded_update(cfg, theta, s, p, g, mesh=mesh, param_specs=rep),
                 donate_argnums=(0, 1))
    rows_out.append(bench("dp", dp, sr, pr, gr))
    info = {"params": total, "hidden_size": args.hidden, "devices": n, "cpu_count": os.cpu_count(),
            "loadavg_at_end": os.getloadavg(), "isa": lopt_ext._ffi.cpu_isa(), "rows": rows_out}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)
    print(json.dumps({k: v for k, v in info.items() if k != "rows"}))


if __name__ == "__main__":
    main()

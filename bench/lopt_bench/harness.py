"""Workloads, jitted steps and derived metrics for the optimizer benchmarks.

Everything the pytest-benchmark suite (bench_step.py), the peak-RSS probe and the
smoke test share lives here, so the numbers are computed one way only.

Protocol for one (optimizer, workload) case:
  * inputs (params, grads, optimizer state) are built once;
  * the step is ``jax.jit(step, donate_argnums=(0, 1))``: params and optimizer state are
    donated, grads (and theta) are not, so a step may update params and state in place;
  * it is compiled ahead of time (``.lower(...).compile()``), which also gives XLA's
    ``memory_analysis()``; then warmed up; each timed call runs one step and waits for
    it with ``jax.block_until_ready``; the statistic reported is the median.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from lopt_ext import timing
from lopt_ext.timing import choose_rounds, memory_analysis  # noqa: F401  (used by bench_step.py)
from lopt_bench import BENCH_DIR, REPO_ROOT, child_env  # noqa: F401
from lopt_bench.metrics import (HIDDEN_LAYERS, MIN_BYTES_PER_PARAM, NUM_FEATURES, derived,  # noqa: F401
                           useful_flops_per_param)

# pretrained: what lopt_ext.pretrained.load() gives a user (the shipped default rule, its own
# configuration and trained theta) through the fused kernel
# fused_bf16: the fused step with the opt-in bf16 (AMX) CPU precision, at H=32 only (below 16
# hidden units it is the float32 step), and only on CPUs that have it.
OPTIMIZERS = ("fused", "fused_bf16", "reference", "pretrained", "adam", "adafactor")
LOPT_OPTIMIZERS = ("fused", "fused_bf16", "reference")  # the ones with a hidden size
HIDDEN_SIZES = (4, 32)


def hidden_sizes(opt: str) -> Tuple[Optional[int], ...]:
    if opt == "fused_bf16":
        from lopt_ext import _ffi
        return (32,) if _ffi.cpu_bf16_available() else ()
    return HIDDEN_SIZES if opt in LOPT_OPTIMIZERS else (None,)


# ----------------------------------------------------------------------------- sizes

def _matrix_shape(n: int) -> Tuple[int, int]:
    """A near-square (rows, cols) with rows * cols == n (rows <= cols)."""
    r = int(math.isqrt(n))
    while n % r:
        r -= 1
    return (r, n // r)


@dataclasses.dataclass(frozen=True)
class Workload:
    """kind: 'tensor' (one matrix), 'model' (a transformer-like pytree) or 'population'
    (a small MLP's pytree, ``members`` copies stepped by one vmapped call as in meta-training;
    num_params counts one member)."""
    kind: str
    label: str
    shapes: Tuple[Tuple[str, Tuple[int, ...]], ...]
    group: str = ""  # pytest-benchmark group; defaults to the label
    members: int = 1

    @property
    def group_name(self) -> str:
        return self.group or self.label

    @property
    def num_params(self) -> int:
        return int(sum(math.prod(s) for _, s in self.shapes))

    @property
    def num_tensors(self) -> int:
        return len(self.shapes)

    def describe(self) -> str:
        if self.kind == "tensor":
            return "x".join(map(str, self.shapes[0][1]))
        ranks = {}
        for _, s in self.shapes:
            ranks[len(s)] = ranks.get(len(s), 0) + 1
        return f"{self.num_tensors} tensors (" + ", ".join(
            f"{c} rank-{r}" for r, c in sorted(ranks.items())) + ")"


def tensor_workload(n: int) -> Workload:
    return Workload("tensor", f"tensor-{_fmt_count(n)}", (("w", _matrix_shape(n)),))


def model_workload(d_model: int, n_layers: int, vocab: int, label: Optional[str] = None) -> Workload:
    """A decoder-transformer-shaped pytree: token embedding, per layer two layer norms
    (scale, bias), attention q/k/v/out projections with biases, a 4x MLP with biases,
    a final norm and an output head. Many matrices plus many small vectors."""
    d = d_model
    shapes: List[Tuple[str, Tuple[int, ...]]] = [("embed", (vocab, d))]
    for i in range(n_layers):
        pre = f"layer{i:02d}/"
        shapes += [(pre + "ln1_scale", (d,)), (pre + "ln1_bias", (d,))]
        for proj in ("q", "k", "v", "o"):
            shapes += [(pre + f"attn_{proj}_w", (d, d)), (pre + f"attn_{proj}_b", (d,))]
        shapes += [(pre + "ln2_scale", (d,)), (pre + "ln2_bias", (d,)),
                   (pre + "mlp_in_w", (d, 4 * d)), (pre + "mlp_in_b", (4 * d,)),
                   (pre + "mlp_out_w", (4 * d, d)), (pre + "mlp_out_b", (d,))]
    shapes += [("final_ln_scale", (d,)), ("final_ln_bias", (d,)), ("head_w", (d, vocab)),
               ("head_b", (vocab,))]
    wl = Workload("model", "", tuple(shapes))
    return dataclasses.replace(wl, label=label or f"model-{_fmt_count(wl.num_params)}")


def population_workload(n: int, members: int) -> Workload:
    """An MLP 16 -> h -> h -> 1 with biases of ~n parameters (the meta-training tasks' kind of
    model), ``members`` of them in one vmapped step."""
    h = max(1, round(-9.5 + math.sqrt(90.25 + n - 1)))  # 16h + h^2 + 3h + 1 = n
    shapes = (("w1", (16, h)), ("b1", (h,)), ("w2", (h, h)), ("b2", (h,)), ("w3", (h, 1)), ("b3", (1,)))
    wl = Workload("population", "", shapes, members=members)
    return dataclasses.replace(wl, label=f"mlp-{_fmt_count(wl.num_params)}-x{members}",
                               group=f"population-{_fmt_count(n)}")


def _fmt_count(n: int) -> str:
    if n >= 1000 and n == 10 ** round(math.log10(n)):
        return f"1e{round(math.log10(n))}"
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


# Size sets. LOPT_BENCH_SIZES=full (default) | small | smoke.
# Models are sized to sit near 1e6 and 1e7 parameters (and a tiny one for smoke).
SIZE_SETS = {
    "full": {"tensor": (10 ** 4, 10 ** 5, 10 ** 6, 10 ** 7),
             "model": ((128, 4, 1000), (256, 12, 1000))},
    "small": {"tensor": (10 ** 4, 10 ** 5), "model": ((64, 2, 500),)},
    "smoke": {"tensor": (2048,), "model": ((16, 1, 24),), "population": ((1000, 4),)},
    # the meta-training inner step: small models alone and in populations (issue 11 part 4)
    "population": {"tensor": (), "model": (), "population": tuple(
        (n, m) for n in (10 ** 3, 10 ** 4, 10 ** 5) for m in (1, 16, 64) if n * m <= 2 * 10 ** 6)},
}
# The pure-JAX reference materialises ~39 features and the hidden activations per
# parameter (hundreds of bytes each): cap the sizes it runs at, per hidden size
# (H=32: the 1e6 tensor and the ~1e6 model, not 1e7).
DEFAULT_REFERENCE_MAX = {4: 10 ** 7, 32: 2 * 10 ** 6}


def size_set_name() -> str:
    name = os.environ.get("LOPT_BENCH_SIZES", "full")
    if name not in SIZE_SETS:
        raise ValueError(f"LOPT_BENCH_SIZES must be one of {sorted(SIZE_SETS)}, got {name!r}")
    return name


def workloads(size_set: Optional[str] = None) -> List[Workload]:
    sizes = SIZE_SETS[size_set or size_set_name()]
    out = [tensor_workload(n) for n in sizes["tensor"]]
    out += [model_workload(*cfg) for cfg in sizes["model"]]
    out += [population_workload(*cfg) for cfg in sizes.get("population", ())]
    return out


def comparison_tensor(model: Workload) -> Workload:
    """A single matrix with (almost) the model's parameter count, for the pytree-vs-tensor ratio."""
    n = model.num_params
    # Avoid degenerate factorisations (a prime count would give shape (1, n)): round to
    # a multiple of 1000; the ratio is taken per parameter so the tiny mismatch cancels.
    n_round = max(1000, int(round(n / 1000.0)) * 1000)
    return Workload("tensor_same_count", f"tensor-{_fmt_count(n_round)}",
                    (("w", _matrix_shape(n_round)),), group=model.label)


def reference_max(hidden_size: int) -> int:
    env = os.environ.get(f"LOPT_BENCH_REFERENCE_MAX_H{hidden_size}") or os.environ.get(
        "LOPT_BENCH_REFERENCE_MAX")
    if env:
        return int(float(env))
    return DEFAULT_REFERENCE_MAX.get(hidden_size, 10 ** 6)


def cases(size_set: Optional[str] = None) -> List[Tuple[Workload, str, Optional[int]]]:
    """(workload, optimizer, hidden_size or None) for every benchmark of a size set.

    Each workload's optimizers run one after the other (similar machine load); a model's
    fused cases alternate with its same-count single matrix, for the pytree/tensor ratio.
    """
    out = []
    for wl in workloads(size_set):
        for opt in OPTIMIZERS:
            for h in hidden_sizes(opt):
                if opt == "reference" and wl.num_params * wl.members > reference_max(h):
                    continue
                out.append((wl, opt, h))
                if wl.kind == "model" and opt in ("fused", "fused_bf16"):
                    out.append((comparison_tensor(wl), opt, h))
    return out


def case_id(wl: Workload, opt: str, hidden: Optional[int]) -> str:
    return f"{wl.label}-{opt}" + (f"-H{hidden}" if hidden else "")


# ----------------------------------------------------------------------------- steps

def make_params_grads(wl: Workload, seed: int = 0):
    """Deterministic float32 params ~N(0, 1) and grads ~N(0, 1e-2) + 0.01 * params
    (population: a leading members axis)."""
    rng = np.random.default_rng(seed)
    params, grads = {}, {}
    for name, shape in wl.shapes:
        shape = ((wl.members,) if wl.kind == "population" else ()) + tuple(shape)
        p = rng.standard_normal(shape, dtype=np.float32)
        g = np.float32(0.01) * rng.standard_normal(shape, dtype=np.float32) + np.float32(0.01) * p
        params[name] = jnp.asarray(p)
        grads[name] = jnp.asarray(g)
    return params, grads


@dataclasses.dataclass
class Prepared:
    """A compiled step and its live inputs; ``run()`` performs one step in place."""
    wl: Workload
    optimizer: str
    hidden_size: Optional[int]
    compiled: Any
    carry: Tuple[Any, Any]  # (params, state), donated and replaced by every call
    extra_args: Tuple[Any, ...]  # not donated: grads (and theta)
    state_bytes: int
    compile_s: float
    memory: Dict[str, int]

    def run(self):
        self.carry = self.compiled(*self.carry, *self.extra_args)
        jax.block_until_ready(self.carry)
        return self.carry


def _tree_bytes(tree) -> int:
    return int(sum(np.asarray(x).nbytes if not hasattr(x, "nbytes") else x.nbytes
                   for x in jax.tree_util.tree_leaves(tree)))


def build_step(opt: str, hidden_size: Optional[int], members: int = 0):
    """(step_fn, init_fn, extra): step(params, state, grads, *extra) -> (params, state).
    members > 0: the step of a population, vmapped over every argument (each member its own
    theta, as PES perturbs it)."""
    if opt in LOPT_OPTIMIZERS or opt == "pretrained":
        from lopt_ext import SmallFcLOpt, fused_update, init_state, pretrained
        if opt == "pretrained":
            lopt, theta = pretrained.load()
        else:
            lopt = SmallFcLOpt(hidden_size=hidden_size, hidden_layers=HIDDEN_LAYERS)
            theta = lopt.init_theta(jax.random.PRNGKey(0))
        impl = "reference" if opt == "reference" else "fused"  # fused_bf16: see prepare

        def step(params, state, grads, theta):
            return fused_update(lopt, theta, state, params, grads, impl=impl)

        init = lambda params: init_state(lopt, params)  # noqa: E731
        if members:
            noise = lambda k, x: x + 0.01 * jax.random.normal(k, (members,) + x.shape)  # noqa: E731
            leaves, tree = jax.tree_util.tree_flatten(theta)
            keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
            theta = jax.tree_util.tree_unflatten(tree, [noise(k, x) for k, x in zip(keys, leaves)])
            return jax.vmap(step), jax.vmap(init), (theta,)
        return step, init, (theta,)
    import optax
    if opt == "adam":
        tx = optax.adam(1e-3)
    elif opt == "adafactor":
        tx = optax.adafactor(1e-3)
    else:
        raise ValueError(f"unknown optimizer {opt!r}; expected one of {OPTIMIZERS}")

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    if members:
        return jax.vmap(step), jax.vmap(tx.init), ()
    return step, tx.init, ()


def prepare(wl: Workload, opt: str, hidden_size: Optional[int], seed: int = 0) -> Prepared:
    step, init, extra = build_step(opt, hidden_size, wl.members if wl.kind == "population" else 0)
    params, grads = make_params_grads(wl, seed)
    state = init(params)
    jitted = jax.jit(step, donate_argnums=(0, 1))
    from lopt_ext import _ffi
    old_precision = _ffi.cpu_precision()
    _ffi.set_cpu_precision("bf16" if opt == "fused_bf16" else "fp32")  # read while tracing
    try:
        t0 = time.perf_counter()
        compiled = jitted.lower(params, state, grads, *extra).compile()
        compile_s = time.perf_counter() - t0
    finally:
        _ffi.set_cpu_precision(old_precision)
    return Prepared(wl, opt, hidden_size, compiled, (params, state), (grads, *extra),
                    _tree_bytes(state), compile_s, memory_analysis(compiled))


def time_steps(prep: Prepared, rounds: int, warmup: int = 1) -> List[float]:
    """Per-step wall times (s) outside pytest-benchmark (smoke test, quick checks), by the one
    step timer (lopt_ext.timing)."""
    return timing.time_calls(prep.run, rounds=rounds, warmup=warmup)


# ----------------------------------------------------------------------------- metrics

def case_info(prep: Prepared) -> Dict[str, Any]:
    """Static facts of a case (sizes, memory), stored in the JSON's extra_info."""
    n = prep.wl.num_params
    info = {
        "workload": prep.wl.label,
        "workload_kind": prep.wl.kind,
        "workload_shape": prep.wl.describe(),
        "num_params": n,
        "num_tensors": prep.wl.num_tensors,
        "members": prep.wl.members,
        "optimizer": prep.optimizer,
        "hidden_size": prep.hidden_size,
        "hidden_layers": HIDDEN_LAYERS if prep.optimizer in LOPT_OPTIMIZERS else None,
        "compile_s": prep.compile_s,
        "state_bytes": prep.state_bytes,
        "state_bytes_per_param": prep.state_bytes / (n * prep.wl.members),
        "min_bytes_per_param": MIN_BYTES_PER_PARAM[prep.optimizer],
        "useful_flops_per_param": (useful_flops_per_param(prep.hidden_size)
                                   if prep.optimizer in LOPT_OPTIMIZERS else None),
    }
    info.update({f"xla_{k}": v for k, v in prep.memory.items()})
    if "temp_size_in_bytes" in prep.memory:
        info["temp_bytes_per_param"] = prep.memory["temp_size_in_bytes"] / (n * prep.wl.members)
    return info


# ----------------------------------------------------------------------------- peak RSS

def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_probe(wl: Workload, opt: str, hidden_size: Optional[int], steps: int = 3) -> Dict[str, Any]:
    """Meant to run in a fresh process: the peak RSS of running steps, above the live inputs.

    Builds inputs and state and compiles the step (nothing has run yet), reads the resident
    set, resets the kernel's peak-RSS counter (VmHWM, via /proc/self/clear_refs) and runs
    ``steps`` steps, the first one included (allocators keep what a first step took, so a
    baseline taken after it would hide the step's temporaries). step_delta = VmHWM after the
    steps minus VmRSS before them. Falls back to getrusage's ru_maxrss (whole-process peak,
    including compilation) where VmHWM can't be reset; rss_method says which.
    """
    import resource
    prep = prepare(wl, opt, hidden_size)
    before = _proc_status_kib("VmRSS")
    reset = _reset_peak_rss()
    for _ in range(steps):
        prep.run()
    peak = _proc_status_kib("VmHWM") if reset else None
    after = _proc_status_kib("VmRSS")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    use_hwm = bool(reset and peak)
    out = {"rss_method": "VmHWM reset via /proc/self/clear_refs" if use_hwm else "ru_maxrss",
           "rss_steps": steps,
           "rss_before_step_bytes": (before or 0) * 1024,
           "rss_peak_bytes": (peak if use_hwm else maxrss) * 1024,
           "rss_after_steps_bytes": (after or 0) * 1024,
           "ru_maxrss_bytes": maxrss * 1024}
    out["rss_step_delta_bytes"] = max(0, out["rss_peak_bytes"] - out["rss_before_step_bytes"])
    out["rss_step_delta_per_param"] = out["rss_step_delta_bytes"] / wl.num_params
    return out


def run_rss_probe(wl: Workload, opt: str, hidden_size: Optional[int], timeout: float = 600) -> Dict[str, Any]:
    """rss_probe in a fresh Python process (so earlier cases don't hide this one's peak)."""
    spec = {"kind": wl.kind, "label": wl.label, "shapes": [[n, list(s)] for n, s in wl.shapes],
            "optimizer": opt, "hidden_size": hidden_size}
    proc = subprocess.run([sys.executable, "-m", "lopt_bench.harness", "rss", json.dumps(spec)],
                          cwd=BENCH_DIR, env=child_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"rss_error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main(argv: List[str]) -> int:
    if len(argv) == 2 and argv[0] == "rss":
        spec = json.loads(argv[1])
        wl = Workload(spec["kind"], spec["label"], tuple((n, tuple(s)) for n, s in spec["shapes"]))
        print(json.dumps(rss_probe(wl, spec["optimizer"], spec["hidden_size"])))
        return 0
    if len(argv) == 1 and argv[0] == "list":
        for wl, opt, h in cases():
            print(case_id(wl, opt, h), wl.num_params, wl.describe())
        return 0
    print("usage: python -m lopt_bench.harness rss '<json spec>' | list", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

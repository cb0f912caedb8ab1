"""The one step timer, and the machine's ceilings the timings are read against.

Used by the tradeoffs study, the demo and the benchmarks (bench/lopt_bench), so that a step
time means the same thing everywhere: warm-up calls first (compilation and first-touch page
faults excluded), then timed calls, each waiting for its result, and the median reported.
Only the standard library and numpy are imported at module level.
"""
from __future__ import annotations

import platform
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

MAX_ROUNDS = 400


def choose_rounds(step_s: float, budget_s: float, min_rounds: int = 3, max_rounds: int = 200) -> int:
    """Enough rounds for a stable median within roughly ``budget_s`` seconds."""
    if step_s <= 0:
        return max_rounds
    return int(max(min_rounds, min(max_rounds, budget_s / step_s)))


def time_calls(run: Callable[[], Any], *, rounds: int, warmup: int = 1, min_timed_s: float = 0.0,
               max_rounds: int = MAX_ROUNDS) -> List[float]:
    """Wall seconds of ``rounds`` calls of ``run`` (which must wait for its own result, e.g. with
    jax.block_until_ready), after ``warmup`` untimed calls. With ``min_timed_s``, fast calls get
    more rounds (up to ``max_rounds``) so that the timed calls cover about that long."""
    estimate = None
    for _ in range(warmup):
        t0 = time.perf_counter()
        run()
        estimate = time.perf_counter() - t0
    if min_timed_s > 0 and estimate is not None:
        rounds = max(rounds, min(max_rounds, int(min_timed_s / max(estimate, 1e-6))))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times


def median_step_s(run: Callable[[], Any], **kwargs) -> float:
    """The median of ``time_calls(run, **kwargs)``."""
    return float(np.median(time_calls(run, **kwargs)))


def memory_analysis(compiled) -> Dict[str, int]:
    """XLA's static buffer accounting of a compiled function (bytes); {} where unavailable."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return {}
    if ma is None:
        return {}
    out = {}
    for key in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
                "alias_size_in_bytes", "generated_code_size_in_bytes"):
        if hasattr(ma, key):
            out[key] = int(getattr(ma, key))
    return out


# ----------------------------------------------------------------------------- ceilings
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sgemm_gflops(n: int = 2048, repeats: int = 7) -> Dict[str, Any]:
    """float32 ``a @ b`` of n x n matrices with numpy's BLAS (2 n^3 FLOP per product): the best
    and the median of ``repeats`` products, after one warm-up."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    times = time_calls(lambda: np.matmul(a, b, out=c), rounds=repeats)
    flop = 2.0 * n ** 3
    # a wrong BLAS kernel must not pass as a fast one
    ref = a[:8].astype(np.float64) @ b.astype(np.float64)
    err = float(np.max(np.abs(c[:8] - ref)) / np.max(np.abs(ref)))
    return {"sgemm_gflops": flop / min(times) / 1e9, "sgemm_gflops_median": flop / float(np.median(times)) / 1e9,
            "sgemm_n": n, "sgemm_repeats": repeats, "sgemm_rel_err": err}


def stream_gbs(mib: int = 256, repeats: int = 7) -> Dict[str, Any]:
    """GB/s (1e9 B) of a jitted XLA in-place ``x <- 1.0001 x + 1`` over ``mib`` MiB of float32
    (x donated: the access pattern of an optimizer step), counting the bytes read and written
    (2 per element x 4 B); best and median of ``repeats``."""
    import jax
    import jax.numpy as jnp
    n = mib * (1 << 20) // 4
    f = jax.jit(lambda x: x * jnp.float32(1.0001) + jnp.float32(1.0), donate_argnums=0)
    box = [jnp.zeros((n,), jnp.float32)]

    def run():
        box[0] = jax.block_until_ready(f(box[0]))

    times = time_calls(run, rounds=repeats)
    moved = 2 * 4 * n
    return {"stream_gbs": moved / min(times) / 1e9, "stream_gbs_median": moved / float(np.median(times)) / 1e9,
            "stream_mib": mib, "stream_repeats": repeats,
            "stream_method": "jitted XLA in-place x <- a*x + b (donated), bytes read + written"}


def available_memory_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None

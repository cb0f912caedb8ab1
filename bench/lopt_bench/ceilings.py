"""The machine's own ceilings, measured with numpy: sgemm GFLOP/s and memory bandwidth.

    PYTHONPATH=bench python -m lopt_bench.ceilings     # prints JSON; --quick for tiny sizes

``measure()`` runs this module in a child process whose environment lacks
OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE: some machines set them to work around old
OpenBLAS builds, and they make a current numpy pick a slower kernel. Only that child
sees the change; the benchmarks themselves keep the environment they were given. The
child records which BLAS (and which OpenBLAS core kernel) actually ran, via threadpoolctl.

* sgemm: float32 ``a @ b`` of n x n matrices (n = 2048), 2 n^3 FLOP per product; the
  ceiling is the best of several repeats (BLAS threads = all cores it is allowed).
* bandwidth: STREAM-style copy (b = a), triad (a = b + s * c) and an in-place update
  (b += s * c, the access pattern of an optimizer step) over arrays far larger than the
  caches, split across one thread per core (numpy releases the GIL inside these loops).
  Bytes counted as STREAM does: copy 2, triad and update 3 arrays per pass (no
  write-allocate traffic), the same convention as the 44 B/param of a fused step. The
  ceiling is the best of the three. Triad/update run in 1 MiB blocks so the temporary
  ``s * c`` stays in cache.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from lopt_ext.timing import cpu_model, sgemm_gflops, time_calls  # noqa: F401  (one definition, shared with tradeoffs)

SCRUBBED_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _split(n: int, parts: int):
    step = -(-n // parts)
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def bandwidth_gbs(mib: int = 512, repeats: int = 5, threads: int | None = None, block: int = 1 << 18):
    """Copy and triad bandwidth (GB/s, 1e9 bytes) over float32 arrays of ``mib`` MiB each."""
    threads = threads or _cores()
    n = mib * (1 << 20) // 4
    a = np.ones(n, np.float32)  # touched: page faults are not part of the timing
    b = np.full(n, 2.0, np.float32)
    c = np.full(n, 0.5, np.float32)
    s = np.float32(3.0)
    chunks = _split(n, threads)

    def copy_chunk(lo_hi):
        lo, hi = lo_hi
        np.copyto(b[lo:hi], a[lo:hi])

    def triad_chunk(lo_hi):
        lo, hi = lo_hi
        tmp = np.empty(block, np.float32)
        for i in range(lo, hi, block):
            j = min(hi, i + block)
            t = tmp[: j - i]
            np.multiply(c[i:j], s, out=t)
            np.add(b[i:j], t, out=a[i:j])

    def update_chunk(lo_hi):  # in place, as an optimizer step writes its state
        lo, hi = lo_hi
        tmp = np.empty(block, np.float32)
        for i in range(lo, hi, block):
            j = min(hi, i + block)
            t = tmp[: j - i]
            np.multiply(c[i:j], s, out=t)
            np.add(b[i:j], t, out=b[i:j])

    results = {}
    with ThreadPoolExecutor(threads) as pool:
        for name, fn, arrays in (("copy", copy_chunk, 2), ("triad", triad_chunk, 3),
                                 ("update", update_chunk, 3)):
            times = time_calls(lambda: list(pool.map(fn, chunks)), rounds=repeats)  # one warm-up pass first
            results[f"{name}_gbs"] = arrays * a.nbytes / min(times) / 1e9
            results[f"{name}_gbs_median"] = arrays * a.nbytes / float(np.median(times)) / 1e9
    if not np.allclose(a[:: max(1, n // 1000)], 1.0 + 3.0 * 0.5):  # b = a = 1 after the copy
        raise RuntimeError("triad produced wrong values")
    results.update({"bandwidth_gbs": max(results[f"{k}_gbs"] for k in ("copy", "triad", "update")),
                    "bandwidth_array_mib": mib, "bandwidth_threads": threads,
                    "bandwidth_repeats": repeats})
    return results


def blas_info():
    try:
        import threadpoolctl
    except ImportError:
        return [{"error": "threadpoolctl not installed"}]
    keep = ("user_api", "internal_api", "prefix", "version", "architecture", "threading_layer", "num_threads")
    return [{k: v for k, v in d.items() if k in keep} for d in threadpoolctl.threadpool_info()]


def measure_here(quick: bool = False):
    out = {"cpu_model": cpu_model(), "cores": _cores(), "numpy": np.__version__}
    if quick:
        out.update(sgemm_gflops(n=256, repeats=3))
        out.update(bandwidth_gbs(mib=8, repeats=2))
    else:
        out.update(sgemm_gflops())
        out.update(bandwidth_gbs())
    out["blas"] = blas_info()
    out["child_env"] = {k: os.environ.get(k) for k in SCRUBBED_ENV}  # None: unset
    return out


def measure(quick: bool = False, timeout: float = 600):
    """Ceilings from a child process with OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE unset."""
    from lopt_bench import BENCH_DIR, child_env
    cmd = [sys.executable, "-m", "lopt_bench.ceilings"] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, cwd=BENCH_DIR, env=child_env(drop=SCRUBBED_ENV), capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"ceiling measurement failed: {proc.stderr.strip()[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["parent_env"] = {k: os.environ.get(k) for k in SCRUBBED_ENV}  # what the benchmarks ran with
    return out


if __name__ == "__main__":
    result = measure_here(quick="--quick" in sys.argv[1:])
    print(json.dumps(result))

"""pytest-benchmark configuration for the optimizer benchmarks (see docs/benchmarks.md).

Adds to the saved JSON's machine_info a "lopt_bench" entry: the machine's measured
ceilings (lopt_bench/ceilings.py, at the start and again at the end of the run; the best
of the two counts), library versions, CPU model, the kernels' instruction set,
the git commit, the size set and the load average at start and end.
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess

import pytest

from lopt_bench import ceilings as ceilings_mod
from lopt_bench import harness

_SESSION = {}


def _git(*args):
    try:
        return subprocess.run(["git", *args], cwd=harness.REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _versions():
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for dist in ("jax", "jaxlib", "numpy", "optax", "pytest-benchmark"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    import lopt_ext
    out["lopt_ext"] = lopt_ext.__version__
    return out


def _isa():
    try:
        from lopt_ext import _ffi
        return _ffi.cpu_isa()
    except Exception as e:  # the fused kernels are missing: the fused cases will fail loudly
        return f"unavailable ({type(e).__name__})"


def pytest_configure(config):
    _SESSION["started"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    _SESSION["loadavg_start"] = os.getloadavg()


@pytest.fixture(scope="session")
def machine_ceilings():
    """sgemm GFLOP/s and memory GB/s, measured once per run (quick sizes under the smoke set)."""
    if "ceilings" not in _SESSION:
        if os.environ.get("LOPT_BENCH_CEILINGS", "1") == "0":
            _SESSION["ceilings"] = {}
        else:
            _SESSION["ceilings"] = ceilings_mod.measure(quick=harness.size_set_name() == "smoke")
    return _SESSION["ceilings"]


def _final_ceilings():
    """Ceilings measured again at the end of a run (the machine may be shared): the best of
    the two is the ceiling; both measurements are kept."""
    start = _SESSION.get("ceilings")
    if not start or os.environ.get("LOPT_BENCH_CEILINGS", "1") == "0" or harness.size_set_name() == "smoke":
        return start or {}
    try:
        end = ceilings_mod.measure()
    except Exception as e:  # keep the start measurement rather than lose the run
        return dict(start, end_error=str(e))
    best = dict(start if start["sgemm_gflops"] >= end["sgemm_gflops"] else end)
    bw = start if start["bandwidth_gbs"] >= end["bandwidth_gbs"] else end
    for k, v in bw.items():
        if k.startswith(("copy_", "triad_", "update_", "bandwidth_")):
            best[k] = v
    best["measurements"] = {"start": start, "end": end}
    return best


def pytest_benchmark_update_machine_info(config, machine_info):
    import jax
    info = {
        "started_utc": _SESSION.get("started"),
        "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": _SESSION.get("loadavg_start"),
        "loadavg_end": os.getloadavg(),
        "size_set": harness.size_set_name(),
        "reference_max_params": {h: harness.reference_max(h) for h in harness.HIDDEN_SIZES},
        "cpu_model": ceilings_mod.cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_isa": _isa(),
        "lopt_cpu_isa_env": os.environ.get("LOPT_CPU_ISA"),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "versions": _versions(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "ceilings": _final_ceilings(),
    }
    machine_info["lopt_bench"] = info

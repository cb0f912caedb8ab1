"""Meta-training throughput (issue 25 item 5): PES inner member-steps per second against
learned_optimization's own PES on the same work, and the shipped recipe's task-steps per hour.

Each case runs its tool (tools/metatrain_throughput.py, tools/lo_pes_throughput.py,
tools/es_throughput.py) in a fresh process, because the CPU device count has to be fixed before
jax starts; the tool leaves compilation out and the numbers it reports go to the case's
extra_info (the case's own time is the whole process, compilation included). The report
(tools/bench_report.py) puts them in a "Meta-training throughput" table.

Environment (besides bench/bench_step.py's LOPT_BENCH_SIZES):
    LOPT_BENCH_LO_PYTHON     a python that has learned_optimization (and its dependencies);
                             without it the comparison case is skipped
    LOPT_BENCH_LO_PATH       prepended to that python's PYTHONPATH (e.g. an unpacked wheel)
    LOPT_BENCH_PES_STEPS     outer steps each PES tool times (default 100; smoke: 5)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lopt_bench import REPO_ROOT, child_env, harness

TOOLS = os.path.join(REPO_ROOT, "tools")
# The work both PES implementations time: issue 10's digits MLP (2.4k parameters), small_fc_lopt
# H=4, 8 antithetic pairs, truncations of 20 steps, trajectories of 600.
PES_TASK, PES_HORIZON = "mlp_digits_32_relu_b64_s1", 600


def _smoke():
    return harness.size_set_name() == "smoke"


def _pes_steps():
    return int(os.environ.get("LOPT_BENCH_PES_STEPS", "5" if _smoke() else "100"))


def _run_tool(cmd, env, timeout=1800):
    """The tool's JSON line (its last line on stdout)."""
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{os.path.basename(cmd[1])} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _record(benchmark, fn, **info):
    out = {}
    benchmark.pedantic(lambda: out.update(fn()), rounds=1, warmup_rounds=0, iterations=1)
    benchmark.extra_info.update(dict(info, metatrain=out))
    return out


def _lopt_ext_pes():
    return _run_tool([sys.executable, os.path.join(TOOLS, "metatrain_throughput.py"), "--num-tasks", "1",
                      "--task-names", PES_TASK, "--horizon", str(PES_HORIZON), "--steps", str(_pes_steps())],
                     child_env())


def test_pes_lopt_ext(benchmark):
    benchmark.group = "metatrain"
    benchmark.name = "pes-lopt_ext"
    out = _record(benchmark, _lopt_ext_pes, implementation="lopt_ext")
    assert out["member_steps_per_s"] > 0


def test_pes_learned_optimization(benchmark):
    """learned_optimization's TruncatedPES on the same work, with lopt_ext's measured again
    right after it in the same run, so the ratio compares like with like."""
    python = os.environ.get("LOPT_BENCH_LO_PYTHON")
    if not python:
        pytest.skip("LOPT_BENCH_LO_PYTHON is not set (a python with learned_optimization; docs/benchmarks.md)")
    env = child_env()
    if os.environ.get("LOPT_BENCH_LO_PATH"):
        env["PYTHONPATH"] = os.environ["LOPT_BENCH_LO_PATH"] + os.pathsep + env["PYTHONPATH"]
    benchmark.group = "metatrain"
    benchmark.name = "pes-learned_optimization"
    lo = lambda: _run_tool([python, os.path.join(TOOLS, "lo_pes_throughput.py"), "--task-name", PES_TASK,  # noqa: E731
                            "--horizon", str(PES_HORIZON), "--steps", str(_pes_steps())], env)
    out = _record(benchmark, lo, implementation="learned_optimization")
    ours = _lopt_ext_pes()
    benchmark.extra_info["lopt_ext_same_run"] = ours
    benchmark.extra_info["lopt_ext_over_learned_optimization"] = ours["member_steps_per_s"] / out["member_steps_per_s"]


def test_es_recipe(benchmark):
    """tools/scale_es.py's generation (the search that made the shipped optimizer) on two of
    its tasks; smoke: one task, 200 steps, one pair."""
    benchmark.group = "metatrain"
    benchmark.name = "es-recipe"
    args = ["--task-indices", "0", "--steps", "200", "--pairs", "1"] if _smoke() else []
    out = _record(benchmark, lambda: _run_tool([sys.executable, os.path.join(TOOLS, "es_throughput.py"), *args],
                                               child_env()), implementation="lopt_ext")
    assert out["task_steps_per_hour"] > 0

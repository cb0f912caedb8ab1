"""One optimizer step, side by side: fused small_fc_lopt, its pure-JAX reference,
optax.adam and optax.adafactor, on single tensors (1e4..1e7 parameters) and on
transformer-shaped pytrees (~1e6 and ~1e7 parameters).

Run (from the repository root; see docs/benchmarks.md):

    python -m pytest bench --benchmark-json=bench_results/results.json
    python tools/bench_report.py bench_results/results.json --out-dir bench_results

Environment:
    LOPT_BENCH_SIZES=full|small|smoke     size set (default full)
    LOPT_BENCH_BUDGET_S=4                 seconds of timed rounds per case (min 5 rounds;
                                          smoke: 0, i.e. 2 rounds)
    LOPT_BENCH_RSS=largest|all|none       which cases get a peak-RSS probe in a fresh process
                                          (default: each optimizer's largest single tensor)
    LOPT_BENCH_REFERENCE_MAX[_H4|_H32]    largest parameter count the reference runs at
    LOPT_BENCH_CEILINGS=0                 skip the sgemm/bandwidth ceiling measurement
"""
from __future__ import annotations

import os

import pytest

from lopt_bench import harness

CASES = harness.cases()


def _rss_wanted(wl, opt, hidden) -> bool:
    mode = os.environ.get("LOPT_BENCH_RSS", "largest")
    if mode == "none":
        return False
    if mode == "all":
        return True
    if mode != "largest":
        raise ValueError(f"LOPT_BENCH_RSS must be largest, all or none; got {mode!r}")
    if wl.kind != "tensor":
        return False
    biggest = max(w.num_params for w, o, h in CASES if w.kind == "tensor" and o == opt and h == hidden)
    return wl.num_params == biggest


@pytest.mark.parametrize("wl,opt,hidden", CASES, ids=[harness.case_id(*c) for c in CASES])
def test_step(benchmark, machine_ceilings, wl, opt, hidden):
    benchmark.group = wl.group_name
    benchmark.name = harness.case_id(wl, opt, hidden)
    load_before = os.getloadavg()
    prep = harness.prepare(wl, opt, hidden)
    info = harness.case_info(prep)
    # Warm-up outside the statistics, and an estimate that sizes the number of rounds
    # (slow cases: the warm-up step itself is the estimate).
    est = harness.time_steps(prep, rounds=1, warmup=0)[0]
    if est < 0.5:
        est = min(harness.time_steps(prep, rounds=2, warmup=0))
    smoke = harness.size_set_name() == "smoke"
    budget = float(os.environ.get("LOPT_BENCH_BUDGET_S", "0" if smoke else "4"))
    rounds = harness.choose_rounds(est, budget, min_rounds=2 if smoke else 5)
    benchmark.pedantic(prep.run, rounds=rounds, warmup_rounds=0, iterations=1)  # warmed up above
    info["rounds"] = rounds
    info["loadavg_before"] = load_before
    info["loadavg_after"] = os.getloadavg()
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        # Fractions of the ceilings are left to the report: the ceilings are final only at the end.
        info.update(harness.derived(info, stats.stats.median))
    del prep  # free params/state before a probe process needs the memory
    if _rss_wanted(wl, opt, hidden):
        info.update(harness.run_rss_probe(wl, opt, hidden))
    benchmark.extra_info.update(info)

"""The evaluation's metric: smoothed held-out loss, sustained crossings, tuned baselines."""
import json

import jax
import numpy as np
import pytest

from lopt_ext.metatrain import evaluate as ev


def test_smooth_is_a_trailing_mean_over_20_steps():
    curve = np.array([9.0, 1, 2, 3, 4, 5, 6])          # recorded every 5 steps: window of 4 points
    got = ev.smooth(curve, every=5, window=20)
    want = [9.0, 1, 1.5, 2, 2.5, 3.5, 4.5]              # index 0 (the initial loss) is kept
    np.testing.assert_allclose(got, want)
    assert np.isnan(ev.smooth(np.array([1.0, np.nan, 1, 1, 1, 1]), 5, 20)[2])


def test_steps_to_stay_needs_a_sustained_crossing():
    every, target = 10, 1.0
    # touches the target at step 20, leaves it, stays below from step 50 on
    curve = np.array([5, 3, 0.9, 1.5, 1.2, 0.8, 0.7, 0.6])
    assert ev.steps_to_stay(curve, target, every, horizon=70) == 50
    assert ev.steps_to_stay(curve, target, every, horizon=30) is None   # above at step 30
    assert ev.steps_to_stay(curve, 10.0, every, horizon=70) == 0
    assert ev.steps_to_stay(np.array([5, np.nan, 0.5]), target, every, horizon=20) == 20  # NaN counts as above


def test_compare_ratios_and_divergence():
    every, T = 5, 40
    n = T // every + 1
    base = np.vstack([np.linspace(2, 1, n), np.linspace(2, 1, n)])
    good = np.vstack([np.linspace(2, 0.5, n), np.full(n, 3.0)])  # seed 1 ends above its start: diverged
    good[1, 0] = 2.0
    res = ev.compare(good, base, T, every)
    sm_b = ev.smooth(base, every)[:, -1]
    sm_l = ev.smooth(good, every)[:, -1]
    assert res[0]["final_ratio"] == pytest.approx(sm_l[0] / sm_b[0])
    assert res[0]["steps_ratio"] is not None and 0 < res[0]["steps_ratio"] < 1 and not res[0]["diverged"]
    assert res[1]["steps_ratio"] is None and res[1]["diverged"]
    nan = good.copy()
    nan[0, 3] = np.nan
    assert ev.compare(nan, base, T, every)[0]["diverged"]


def _fake_result(name, ratios, finals):
    per_seed = [{"steps_ratio": r, "final_ratio": f, "diverged": False, "baseline_final": 1.0,
                 "lopt_final": f} for r, f in zip(ratios, finals)]
    entry = {"per_seed": per_seed, "mean_final_ratio": float(np.mean(finals)), "best_lr": 1e-3,
             "baseline_final_train": 0.1, "baseline_curve": []}
    return {"task": name, "by_horizon": {"100": {"adam": entry, "adam_cosine": entry, "lopt_final_train": 0.1}}}


def test_summary_medians_count_never_as_infinite():
    results = [_fake_result("a", [0.2, 0.4, None], [0.9, 0.8, 1.1]), _fake_result("b", [None, None, 0.5], [2.0, 1.8, 1.7])]
    s = ev.summarize(results, horizons=(100,))["adam@100"]
    assert s["task_seeds"] == 6 and s["reached_and_stayed"] == 3
    assert s["median_steps_ratio"] is None      # 3 of 6 never: the median is infinite
    assert s["median_final_ratio"] == pytest.approx(np.median([0.9, 0.8, 1.1, 2.0, 1.8, 1.7]))
    assert s["tasks_worse_than_1.5x"] == ["b"]
    results[1] = _fake_result("b", [0.1, None, 0.5], [1.0, 1.8, 1.7])
    assert ev.summarize(results, horizons=(100,))["adam@100"]["median_steps_ratio"] == pytest.approx(0.45)


def test_baseline_is_tuned_on_held_out_loss_and_cached(tmp_path):
    from lopt_ext import tasks
    task = tasks.get_task("mlp_wine_16_gelu_b64_s1_noise0.3")
    cache = str(tmp_path / "b.json")
    lrs = (1e-4, 1e-2)
    out = ev.baseline_sweep(task, "adam", (0,), 100, lrs=lrs, cache=cache, horizons=(100, 200))
    held, _ = ev.run_curves(task, ev.adam_tx, lrs, [0], 200)
    finals = ev.smooth(held[:, :, :21], ev.EVERY)[:, 0, -1]       # the 100-step prefix
    assert out["best_lr"] == lrs[int(np.argmin(finals))]
    np.testing.assert_allclose(out["curve"], held[int(np.argmin(finals)), :, :21], rtol=1e-6)
    stored = json.load(open(cache))
    assert len(stored) == 2                       # one run served horizons 100 and 200
    again = ev.baseline_sweep(task, "adam", (0,), 200, lrs=lrs, cache=cache, horizons=(100, 200))
    assert again["horizon"] == 200 and again["time_s"] == out["time_s"]  # from the cache
    cos = ev.baseline_sweep(task, "adam_cosine", (0,), 100, lrs=lrs, cache=cache)
    assert cos["horizon"] == 100 and len(cos["curve"][0]) == 21

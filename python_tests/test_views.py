"""The field's views (metatrain/views.py) on hand-made curves, with hand-computed answers."""
import numpy as np
import pytest

from lopt_ext.metatrain import views

EVERY, TRAIN_EVERY, T = 5, 10, 20     # held-out points 0..4, training-loss points 0..2


def cand(label, held, train):
    return (label, np.asarray([held], np.float64), np.asarray([train], np.float64))


# reference candidates: "a" has the lower best held-out (0.8, reached at point 3); "b" the lower
# final held-out (0.85) and final training loss (0.4)
REF_A = cand("a", [2.0, 1.5, 1.0, 0.8, 0.9], [2.0, 1.0, 0.5])
REF_B = cand("b", [2.0, 1.2, 1.1, 1.0, 0.85], [2.0, 0.8, 0.4])


def one(contender):
    out = views.task_views({"c": [contender]}, [REF_A, REF_B], T, EVERY, TRAIN_EVERY)
    return out, {k: v for k, v in out["contenders"]["c"].items() if k != "picked"}


def test_each_view_tunes_the_reference_on_its_own_quantity():
    out, _ = one(cand("c", [2.0, 1.0, 0.7, 0.75, 0.8], [2.0, 0.4, 0.2]))
    assert out["reference"] == {"best_heldout": "a", "time_to_target": "a", "final_heldout": "b",
                                "train_final": "b", "train_speedup": "b"}


def test_a_faster_contender_by_hand():
    _, v = one(cand("c", [2.0, 1.0, 0.7, 0.75, 0.8], [2.0, 0.4, 0.2]))
    assert v["best_heldout"] == [pytest.approx(0.7 / 0.8)]
    assert v["final_heldout"] == [pytest.approx(0.8 / 0.85)]
    assert v["train_final"] == [pytest.approx(0.2 / 0.4)]
    assert v["train_speedup"] == [pytest.approx(T / (1 * TRAIN_EVERY))]  # at b's final 0.4 by step 10
    assert v["time_to_target"] == [pytest.approx(2 / 3)]                 # 0.8 at point 2; "a" at point 3
    assert v["diverged"] == [False]


def test_a_slower_contender_by_hand():
    _, v = one(cand("c", [2.0, 1.9, 1.8, 1.7, 1.6], [2.0, 1.5, 0.8]))
    assert v["train_speedup"] == [pytest.approx(10 / T)]    # never reaches 0.4; b reached its 0.8 at step 10
    assert v["time_to_target"] == [np.inf]
    assert v["best_heldout"] == [pytest.approx(1.6 / 0.8)] and v["diverged"] == [False]


def test_divergence_and_non_finite_losses():
    _, v = one(cand("c", [2.0, 1.0, np.nan, 3.0, 2.5], [2.0, np.nan, np.inf]))
    assert v["diverged"] == [True]
    assert v["final_heldout"] == [pytest.approx(2.5 / 0.85)]
    assert v["best_heldout"] == [pytest.approx(1.0 / 0.8)]  # the NaN point is skipped, not the minimum
    assert v["train_final"] == [np.inf] and v["train_speedup"] == [0.0]
    _, ok = one(cand("c", [2.0, 1.0, 0.9, 0.95, 1.9], [2.0, 1.0, 0.5]))
    assert ok["diverged"] == [False]
    _, up = one(cand("c", [2.0, 1.0, 0.9, 0.95, 2.1], [2.0, 1.0, 0.5]))
    assert up["diverged"] == [True]  # ends above its initial loss


def test_a_candidate_set_scored_against_itself_is_one_everywhere():
    out = views.task_views({"both": [REF_A, REF_B]}, [REF_A, REF_B], T, EVERY, TRAIN_EVERY)
    c = out["contenders"]["both"]
    assert c["picked"] == out["reference"]
    for v in views.VIEWS:
        assert c[v] == [pytest.approx(1.0)], v


def test_iqm_and_bootstrap_intervals():
    assert views.iqm(np.arange(1.0, 9.0)) == pytest.approx(4.5)        # mean of 3, 4, 5, 6
    assert views.iqm([1.0, 2.0, 3.0]) == pytest.approx(2.0)           # fewer than 4: no trimming
    assert views.iqm([1.0, 1.0, 1.0, np.inf]) == 1.0                   # one never among 4 is cut
    const = np.full((5, 3), 0.7)
    assert views.bootstrap(const, "median") == (0.7, 0.7)
    # two tasks far apart, seeds close: the interval spans both tasks (tasks are resampled)
    v = np.array([[1.0, 1.1, 0.9], [3.0, 3.1, 2.9]])
    lo, hi = views.bootstrap(v, "median")
    assert lo <= 1.1 and hi >= 2.9
    # one task: only its seeds vary, and the interval stays within them
    lo, hi = views.bootstrap(np.array([[1.0, 2.0, 3.0]]), "iqm")
    assert 1.0 <= lo < hi <= 3.0
    assert views.bootstrap(v, "median", seed=1) == views.bootstrap(v, "median", seed=1)  # deterministic


def test_aggregate_counts_and_worst():
    a = views.aggregate([[0.5, 1.0, 2.0], [0.9, 1.2, np.inf]])
    assert a["median"] == pytest.approx(1.1) and a["worst"] == np.inf and a["at_least_as_good"] == 3
    s = views.aggregate([[0.5, 2.0, 4.0]], higher_is_better=True)
    assert s["worst"] == 0.5 and s["at_least_as_good"] == 2


def _per_task(best, diverged=False):
    return {"task": "t", "contenders": {"me": {"best_heldout": best, "diverged": [diverged] * len(best)}}}


def test_ship_check_against_the_bar_and_the_peer():
    good = {v: {"median": 0.9} for v in views.VIEWS}
    good["train_speedup"] = {"median": 1.5}
    good["diverged"] = 0
    peer = {v: {"median": 1.0} for v in views.VIEWS}
    peer["train_speedup"] = {"median": 2.0}
    checks = views.ship_check([_per_task([0.9, 1.2])], {"me": good, "celo": peer}, "me")
    failed = [c["criterion"] for c in checks if not c["pass"]]
    assert failed == ["train_speedup median at least as good as celo's (2)"]
    checks = views.ship_check([_per_task([0.9, 1.3])], {"me": good}, "me")
    assert [c["pass"] for c in checks] == [True, True, True, False, True]   # one task-seed at 1.3 > 1.25

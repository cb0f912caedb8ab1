"""The field's views of an optimizer against Adam, from recorded loss curves (numpy only).

Per task and seed, at horizon T, a contender C is scored against a reference R (Adam, tuned per
task over schedules x learning rates on each view's own criterion, the mean over seeds; or one
fixed Adam). Ratios < 1 and speedups > 1 favour C:

- best_heldout:   min over steps <= T of C's smoothed held-out loss / R's, R tuned on that min
                  (early stopping: the user keeps the best checkpoint);
- final_heldout:  smoothed held-out loss at T / R's, R tuned on it;
- train_final:    full-training-set loss at T / R's, R tuned on it (VeLO's and Celo's view);
- train_speedup:  T / (first step at which C's training loss <= R's at T); when C never gets
                  there, (first step at which R's training loss <= C's at T) / T, below 1; 0
                  when C's final training loss is not finite. Resolution: train_every steps;
- time_to_target: AlgoPerf-style: target = R's best smoothed held-out loss (R tuned as for
                  best_heldout); (first step at which C's smoothed held-out loss <= target) /
                  (first step at which R reaches it); inf when C never does;
- diverged:       C's held-out loss is not finite, or ends above its initial value.

A contender may itself be a set of candidates (e.g. Adam over a learning-rate grid): it is then
tuned per view in the same way as the reference, an oracle within that set.

Aggregates over task-seeds: median and interquartile mean (IQM), each with a 95% bootstrap
interval that resamples tasks and then seeds within tasks, so that a lucky task cannot pass for
many lucky seeds.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

VIEWS = ("best_heldout", "final_heldout", "train_final", "train_speedup", "time_to_target")
HIGHER_IS_BETTER = {"train_speedup"}
# the quantity each view tunes a candidate set on (lower is better, mean over seeds)
TUNED_ON = {"best_heldout": "best_heldout", "time_to_target": "best_heldout",
            "final_heldout": "final_heldout", "train_final": "train_final", "train_speedup": "train_final"}
BOOTSTRAP_SAMPLES = 2000
MAX_BAD_BEST_HELDOUT = 1.25  # the shipping bar: no task-seed's best held-out ratio above this

# one candidate: (label, smoothed held-out [S, >= T/every + 1], training loss [S, >= T/train_every + 1])
Candidate = Tuple[str, np.ndarray, np.ndarray]


def _inf_if_bad(x):
    x = np.asarray(x, np.float64)
    return np.where(np.isfinite(x), x, np.inf)


def _first_at_or_below(curve, target) -> Optional[int]:
    hit = np.nonzero(curve <= target)[0]
    return int(hit[0]) if hit.size else None


def _ratio(a, b) -> float:
    return float(a / b) if np.isfinite(a) and np.isfinite(b) and b > 0 else np.inf


def _criterion(quantity, held, train, n, m):
    """Per-seed value of ``quantity`` (non-finite losses count as infinite)."""
    if quantity == "best_heldout":
        return _inf_if_bad(held[:, : n + 1]).min(axis=1)
    if quantity == "final_heldout":
        return _inf_if_bad(held[:, n])
    return _inf_if_bad(train[:, m])


def pick(candidates: Sequence[Candidate], view: str, n: int, m: int) -> Candidate:
    """The candidate with the lowest mean over seeds of the quantity ``view`` is tuned on (the
    first one on ties)."""
    scores = [np.mean(_criterion(TUNED_ON[view], h, t, n, m)) for _, h, t in candidates]
    return candidates[int(np.argmin(scores))]


def _seed_view(view, c_held, c_train, r_held, r_train, n, m, every, train_every, horizon) -> float:
    ch, ct = _inf_if_bad(c_held[: n + 1]), _inf_if_bad(c_train[: m + 1])
    rh, rt = _inf_if_bad(r_held[: n + 1]), _inf_if_bad(r_train[: m + 1])
    if view == "best_heldout":
        return _ratio(ch.min(), rh.min())
    if view == "final_heldout":
        return _ratio(ch[n], rh[n])
    if view == "train_final":
        return _ratio(ct[m], rt[m])
    if view == "train_speedup":
        if not np.isfinite(ct[m]):
            return 0.0
        k = _first_at_or_below(ct, rt[m])
        if k is not None:
            return horizon / (max(k, 1) * train_every)
        j = _first_at_or_below(rt, ct[m])
        return max(j, 1) * train_every / horizon
    if view == "time_to_target":
        target = rh.min()
        k = _first_at_or_below(ch, target)
        if k is None:
            return np.inf
        return max(k, 1) / max(_first_at_or_below(rh, target), 1)
    raise ValueError(f"unknown view {view!r}")


def task_views(contenders: Dict[str, Sequence[Candidate]], reference: Sequence[Candidate], horizon: int,
               every: int, train_every: int) -> Dict[str, Any]:
    """One task's views at ``horizon``: {"reference": {view: label}, "contenders": {name:
    {view: [per seed], "diverged": [per seed], "picked": {view: label}}}}."""
    n, m = horizon // every, horizon // train_every
    chosen = {v: pick(reference, v, n, m) for v in VIEWS}
    out = {"reference": {v: chosen[v][0] for v in VIEWS}, "contenders": {}}
    for name, cands in contenders.items():
        entry = {"picked": {}}
        for v in VIEWS:
            label, ch, ct = pick(cands, v, n, m)
            _, rh, rt = chosen[v]
            entry[v] = [_seed_view(v, ch[s], ct[s], rh[s], rt[s], n, m, every, train_every, horizon)
                        for s in range(ch.shape[0])]
            if len(cands) > 1:
                entry["picked"][v] = label
        _, h, _ = pick(cands, "final_heldout", n, m)
        h = np.asarray(h, np.float64)[:, : n + 1]
        entry["diverged"] = [bool(not np.all(np.isfinite(h[s])) or not h[s, n] <= h[s, 0])
                             for s in range(h.shape[0])]
        out["contenders"][name] = entry
    return out


def iqm(x) -> float:
    """Interquartile mean: the mean of the middle half (floor(n/4) values cut at each end)."""
    x = np.sort(np.asarray(x, np.float64))
    k = len(x) // 4
    return float(np.mean(x[k: len(x) - k]))


def _iqm_rows(x):
    x = np.sort(x, axis=1)
    k = x.shape[1] // 4
    return np.mean(x[:, k: x.shape[1] - k], axis=1)


def bootstrap(values, stat, samples=BOOTSTRAP_SAMPLES, seed=0) -> Tuple[float, float]:
    """95% interval of ``stat`` ("median" or "iqm") over [tasks, seeds] ``values``: tasks are
    resampled with replacement, then seeds with replacement within each drawn task."""
    v = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    t = rng.integers(0, v.shape[0], size=(samples, v.shape[0]))
    s = rng.integers(0, v.shape[1], size=(samples, v.shape[0], v.shape[1]))
    draws = v[t[:, :, None], s].reshape(samples, -1)
    stats = np.median(draws, axis=1) if stat == "median" else _iqm_rows(draws)
    lo, hi = np.quantile(stats, [0.025, 0.975], method="nearest")
    return float(lo), float(hi)


def aggregate(values, higher_is_better=False) -> Dict[str, Any]:
    """Median, IQM, their bootstrap intervals, the worst task-seed and how many reach 1 (<= 1,
    or >= 1 with ``higher_is_better``) over [tasks, seeds] ``values``."""
    v = np.asarray(values, np.float64)
    flat = v.ravel()
    return {"median": float(np.median(flat)), "median_ci": bootstrap(v, "median"),
            "iqm": iqm(flat), "iqm_ci": bootstrap(v, "iqm"),
            "worst": float(flat.min() if higher_is_better else flat.max()),
            "at_least_as_good": int(np.sum(flat >= 1.0) if higher_is_better else np.sum(flat <= 1.0)),
            "task_seeds": int(flat.size), "tasks": int(v.shape[0])}


def summarize_views(per_task: List[Dict[str, Any]], groups: Dict[str, str]) -> Dict[str, Any]:
    """{group: {contender: {view: aggregate, "diverged": count}}} over task_views results
    (``per_task``: [{"task": name, **task_views(...)}]); group "all" plus one per distinct value
    of ``groups`` (task name -> group)."""
    out = {}
    for group in ["all"] + sorted(set(groups.values())):
        rows = [r for r in per_task if group == "all" or groups.get(r["task"]) == group]
        if not rows:
            continue
        out[group] = {}
        for name in rows[0]["contenders"]:
            agg = {v: aggregate([r["contenders"][name][v] for r in rows], v in HIGHER_IS_BETTER) for v in VIEWS}
            agg["diverged"] = int(sum(sum(r["contenders"][name]["diverged"]) for r in rows))
            out[group][name] = agg
    return out


def ship_check(per_task: List[Dict[str, Any]], summary_all: Dict[str, Any], name: str,
               peer: Optional[str] = "celo") -> List[Dict[str, Any]]:
    """The shipping bar (issue 24) for contender ``name`` at one horizon: medians of
    time_to_target, best_heldout and train_final <= 1, no task-seed's best_heldout above
    MAX_BAD_BEST_HELDOUT, no divergence, and (when ``peer`` was evaluated) a median at least as
    good as the peer's in every view."""
    s = summary_all[name]
    worst = max(max(r["contenders"][name]["best_heldout"]) for r in per_task)
    checks = [("median time-to-target <= 1", s["time_to_target"]["median"], s["time_to_target"]["median"] <= 1),
              ("median best held-out <= 1", s["best_heldout"]["median"], s["best_heldout"]["median"] <= 1),
              ("median training loss <= 1", s["train_final"]["median"], s["train_final"]["median"] <= 1),
              (f"no task-seed best held-out > {MAX_BAD_BEST_HELDOUT}", worst, worst <= MAX_BAD_BEST_HELDOUT),
              ("no divergence", s["diverged"], s["diverged"] == 0)]
    if peer and peer in summary_all and peer != name:
        for v in VIEWS:
            mine, theirs = s[v]["median"], summary_all[peer][v]["median"]
            ok = mine >= theirs if v in HIGHER_IS_BETTER else mine <= theirs
            checks.append((f"{v} median at least as good as {peer}'s ({theirs:.3g})", mine, ok))
    return [{"criterion": c, "value": x if isinstance(x, int) else float(x), "pass": bool(ok)} for c, x, ok in checks]

"""How far a learned rule is from tuned Adam once it, too, gets a learning rate tuned per task.

Tuned Adam, the evaluation's baseline, has its learning rate picked per task on the final
held-out loss it is judged on: on the tiny tabular sets that choice is an early stop (a rate
small enough not to overfit by the horizon). A drop-in learned rule has to infer that from
gradients. This probe gives the rule the same oracle: its whole update is multiplied by a
constant c from ``--scales`` (a log grid like Adam's), c is picked per task and horizon on
the mean over seeds of the smoothed final held-out loss, exactly as Adam's rate is, and the
picked runs are scored with the evaluation's metrics. It is a diagnostic, not a shippable
optimizer: if the oracle meets the goal, what is missing is the per-task step size; if it does
not, the rule's update itself falls short.

    python tools/lr_oracle_probe.py --pretrained scaled_small_fc_lopt_h4_es --out runs/lr_oracle \\
        --adam-cache docs/evaluation/baselines.json

Writes OUT/evaluation.json and OUT/evaluation.md (the evaluation's report of the picked runs,
with the picked scale per task and horizon) and OUT/scales.json (every scale's summary).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pick_per_task(runs, horizons):
    """runs: {scale: evaluate() results, tasks in the same order}. Returns (results, picked):
    per task and horizon the entry of the scale whose mean smoothed final held-out loss is
    lowest, and {task: {horizon: scale}}."""
    import numpy as np
    from lopt_ext.metatrain import evaluate as ev
    scales = sorted(runs)
    picked_results, picked = [], {}
    for i, first in enumerate(runs[scales[0]]):
        out = copy.deepcopy(first)
        picked[first["task"]] = {}
        for T in horizons:
            def final(scale):
                r = runs[scale][i]
                assert r["task"] == first["task"]
                sm = ev.smooth(np.asarray(r["lopt_curve"], np.float64), r["every"])[:, T // r["every"]]
                return float(np.mean(sm)) if np.all(np.isfinite(sm)) else np.inf
            best = min(scales, key=final)
            out["by_horizon"][str(T)] = runs[best][i]["by_horizon"][str(T)]
            picked[first["task"]][str(T)] = best
        picked_results.append(out)
    return picked_results, picked


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--theta", help="a theta file")
    src.add_argument("--pretrained", help="a pretrained entry")
    ap.add_argument("--out", required=True)
    ap.add_argument("--adam-cache", required=True, help="the tuned baselines' cache (copied into OUT)")
    ap.add_argument("--tasks", nargs="+", default=None, help="default: the held-out split")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--scales", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0])
    args = ap.parse_args(argv)
    if any(not s > 0 for s in args.scales):
        ap.error("argument --scales: every scale must be > 0")
    if len(set(args.scales)) != len(args.scales):
        ap.error("argument --scales: scales must differ")
    if not os.path.isfile(args.adam_cache):
        ap.error(f"argument --adam-cache: no file {args.adam_cache}")

    import optax
    from lopt_ext import pretrained, tasks
    from lopt_ext.metatrain import evaluate as ev
    from plateau_probe import prepare_out, write_report

    cache = prepare_out(args.out, args.adam_cache)
    lopt, theta, source = pretrained.resolve(args.theta, args.pretrained)
    names = args.tasks or tasks.list_tasks("test")
    runs = {}
    for c in args.scales:
        print(f"== update x {c:g}", flush=True)
        make_tx = lambda _hp, c=c: optax.chain(lopt.transform(theta), optax.scale(c))  # noqa: E731
        runs[c] = ev.evaluate(names, lopt, theta, seeds=tuple(args.seeds), adam_cache=cache, make_tx=make_tx)
    results, picked = pick_per_task(runs, ev.HORIZONS)
    per_scale = {str(c): ev.summarize(r) for c, r in runs.items()}
    with open(os.path.join(args.out, "scales.json"), "w") as f:
        json.dump({"scales": args.scales, "summary_per_scale": per_scale, "picked": picked}, f, indent=1)
    write_report(args.out, source + f" x c, c picked per task and horizon from {args.scales} (oracle)",
                 lopt, args.seeds, results,
                 "python tools/lr_oracle_probe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 picked_scale=picked, scales=args.scales)
    for T in ev.HORIZONS:
        print(f"picked scales @{T}:", {t: p[str(T)] for t, p in picked.items()})


if __name__ == "__main__":
    main()

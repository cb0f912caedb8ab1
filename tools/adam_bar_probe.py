"""One-off: what of issue 24's shipping bar can Adam itself meet? On the committed evaluation's
tasks and seeds at 3000 steps, from the Adam cache (no runs): per task, among Adam's 14 runs
(2 schedules x 7 learning rates), the one with the lowest mean final training loss among those
that on every seed neither diverge nor lose more than 1.25x in best held-out; its views against
Adam tuned per view.

    python tools/adam_bar_probe.py [docs/evaluation/evaluation.json] [docs/evaluation/baselines.json]
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lopt_ext.metatrain import evaluate as ev, views  # noqa: E402
from lopt_ext.tasks import family  # noqa: E402


def main(argv):
    doc_path = argv[0] if argv else "docs/evaluation/evaluation.json"
    cache = argv[1] if len(argv) > 1 else "docs/evaluation/baselines.json"
    doc = json.load(open(doc_path))
    names, seeds, T = [r["task"] for r in doc["results"]], doc["seeds"], 3000
    n, m = T // ev.EVERY, T // ev.TRAIN_EVERY
    per_task, none_ok = [], []
    for t in names:
        both = [c for b in ev.BASELINES
                for c in ev._candidates(family.get_task(t), b, seeds, T, ev.EVERY, ev.DEFAULT_LRS, cache, ev.HORIZONS)]
        res = views.task_views({c[0]: [c] for c in both}, both, T, ev.EVERY, ev.TRAIN_EVERY)["contenders"]
        ok = [c for c in both if not any(res[c[0]]["diverged"])
              and max(res[c[0]]["best_heldout"]) <= views.MAX_BAD_BEST_HELDOUT]
        if not ok:
            none_ok.append(t)
            ok = both
        best = min(ok, key=lambda c: np.mean(views._criterion("train_final", c[1], c[2], n, m)))
        per_task.append({"task": t, **views.task_views({"safe adam": [best]}, both, T, ev.EVERY, ev.TRAIN_EVERY)})
        r = res[best[0]]
        print(f"{t:48s} {best[0]:28s} train {np.round(r['train_final'], 2)} best {np.round(r['best_heldout'], 2)}")
    s = views.summarize_views(per_task, {t: family.data_regime(t) for t in names})
    for g in s:
        a = s[g]["safe adam"]
        print(g, {v: round(a[v]["median"], 3) for v in views.VIEWS}, "diverged", a["diverged"])
    print("tasks where no Adam run meets the per-seed conditions:", none_ok or "none")


if __name__ == "__main__":
    main(sys.argv[1:])

"""One-off probe: what the gap inputs buy when set by hand (docs/metatrain.md, "Gap inputs").

    python tools/gap_probe.py runs/gap_es      # a scale_es.py --loss-inputs train+validation search

Takes the search's best mean, sets its two gap weights (the generalisation gap, the validation
loss's rise over its best) to each pair of a small grid, runs every candidate on the search's
meta-training tasks and seeds, and prints per view (best held-out, final held-out, final
training loss; each the mean clipped log ratio to Adam tuned on that view, 0 = tuned Adam) the
mean over all tasks, the small-data ones (wine, breast cancer) and the rest. Writes
OUT/gap_grid.json.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lopt_ext.metatrain.population import use_cpu_cores  # noqa: E402

use_cpu_cores(None)
import numpy as np  # noqa: E402

import scale_es as se  # noqa: E402
from lopt_ext import checkpoint  # noqa: E402
from lopt_ext.metatrain import evaluate as ev  # noqa: E402
from lopt_ext.tasks import family  # noqa: E402

# (gap weight, rise weight): 0 is the searched rule, negative shrinks the step as the gap or rise grows
GRID = [(0, 0), (-1, 0), (-2, 0), (-4, 0), (0, -2), (0, -4), (0, -8), (-1, -2), (-2, -4), (-4, -8), (1, 0), (0, 2)]
VIEWS = ("best_heldout", "final_heldout", "train_final")


def main(out):
    es = json.load(open(os.path.join(out, "es.json")))
    if es.get("loss_inputs") != "train+validation":
        sys.exit(f"gap_probe: {out} is not a --loss-inputs train+validation search")
    lopt, base = checkpoint.load_theta(os.path.join(out, "start.safetensors"))
    _, best = se.best_mean(es)
    cands = []
    for g, r in GRID:  # the gap weights are the last two coordinates before the bias
        x = best.copy()
        x[-3], x[-2] = g, r
        cands.append(x)
    cands = np.asarray(cands, np.float32)
    tasks = [se.validation_task(family.make_task(family.TRAIN_SPECS[i])) for i in se.TASKS]
    if [t.name for t in tasks] != es["tasks"]:
        sys.exit("gap_probe: the search ran other tasks")
    by_lr = se.adam_candidates(tasks, es["seeds"], es["steps"], os.path.join(out, "adam.json"))
    make_tx = lambda x: lopt.transform(se.with_coordinates(base, x, es["coordinates"]), num_steps=es["steps"])  # noqa: E731
    res = {v: {} for v in VIEWS}
    t0 = time.time()
    for task in tasks:
        held, train = ev.run_curves(task, make_tx, cands, es["seeds"], es["steps"], **ev.loss_values(lopt))
        for v in VIEWS:
            res[v][task.name] = se.score_task_views(held, train, by_lr[task.name], es["steps"], [v],
                                                    tuple(es["clip"])).mean(1).tolist()
    print(f"{time.time() - t0:.0f} s; per view: all / small-data / data-rich")
    small = [t.name for t in tasks if "wine" in t.name or "breast" in t.name]
    print("gap rise | " + " | ".join(VIEWS) + " | mean of the 3")
    for i, (g, r) in enumerate(GRID):
        row, total = [], 0.0
        for v in VIEWS:
            a = np.mean([res[v][t][i] for t in res[v]])
            s = np.mean([res[v][t][i] for t in small])
            d = np.mean([res[v][t][i] for t in res[v] if t not in small])
            total += a / len(VIEWS)
            row.append(f"{a:.3f} / {s:.3f} / {d:.3f}")
        print(f"{g:3} {r:4} | " + " | ".join(row) + f" | {total:.3f}")
    with open(os.path.join(out, "gap_grid.json"), "w") as f:
        json.dump({"grid": GRID, "views": res, "small_data": small}, f)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/gap_probe.py SEARCH_OUT_DIR")
    main(sys.argv[1])

"""Steady-state throughput of the shipped recipe's meta-training: task-steps per hour.

The shipped optimizer (scaled_small_fc_lopt_h4_horizon) was found by tools/scale_es.py, whose
generations are one `evaluate.run_curves` call per task: the mean and 2 x --pairs perturbations
of the rule, each trained for --steps on every seed, held-out loss recorded on the way. This
tool runs that call on each task twice with the search's own settings (the first call compiles
and is left out) and reports task-steps (candidates x seeds x steps) per hour of the second
calls. One JSON line on stdout.

    python tools/es_throughput.py                      # 2 of the search's tasks, its settings
    python tools/es_throughput.py --task-indices 0 --steps 200
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lopt_ext.__main__ import add_cpu_devices_option  # noqa: E402
from lopt_ext.metatrain.population import use_cpu_cores  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task-indices", type=int, nargs="+", default=[0, 13],
                    help="indices into family.TRAIN_SPECS (default: two of tools/scale_es.py's tasks)")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[4, 5])
    ap.add_argument("--steps", type=int, default=1000)
    add_cpu_devices_option(ap)
    args = ap.parse_args(argv)
    devices = use_cpu_cores(args.cpu_devices)
    import numpy as np
    from lopt_ext import pretrained
    from lopt_ext.metatrain import evaluate as ev
    from lopt_ext.scaled import with_horizon_inputs
    from lopt_ext.tasks import family
    from scale_es import coordinates, with_coordinates
    from scale_search import validation_task

    if args.pairs < 1:
        ap.error("argument --pairs: must be >= 1")
    if args.steps < 1 or args.steps % ev.TRAIN_EVERY:
        ap.error(f"argument --steps: must be a positive multiple of {ev.TRAIN_EVERY}")
    bad = [i for i in args.task_indices if not 0 <= i < len(family.TRAIN_SPECS)]
    if bad:
        ap.error(f"argument --task-indices: {bad} out of range (0..{len(family.TRAIN_SPECS) - 1})")
    # The last search that made the shipped entry: horizon inputs on the ES default, the
    # scale's coordinates perturbed (its command is in the entry's JSON).
    lopt, theta = with_horizon_inputs(*pretrained.load("scaled_small_fc_lopt_h4_es"))
    make_tx = lambda x: lopt.transform(with_coordinates(theta, x, "scale"), num_steps=args.steps)
    mean = np.asarray(coordinates(theta, "scale"))
    eps = np.random.default_rng(0).standard_normal((args.pairs, mean.size)).astype(np.float32)
    cands = np.concatenate([mean[None], mean + 0.15 * eps, mean - 0.15 * eps])
    load0 = os.getloadavg()
    per_task, steady = [], 0.0
    for i in args.task_indices:
        task = validation_task(family.make_task(family.TRAIN_SPECS[i]))
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            ev.run_curves(task, make_tx, cands, args.seeds, args.steps)  # returns host arrays: synced
            times.append(time.perf_counter() - t0)
        steady += times[1]
        per_task.append({"task": task.name, "first_call_s": times[0], "steady_call_s": times[1]})
    task_steps = len(cands) * len(args.seeds) * args.steps * len(args.task_indices)
    print(json.dumps({"devices": devices, "candidates": len(cands), "seeds": args.seeds, "steps": args.steps,
                      "tasks": per_task, "task_steps_per_hour": task_steps / steady * 3600,
                      "load_average_start": load0, "load_average_end": os.getloadavg()}), flush=True)


if __name__ == "__main__":
    main()

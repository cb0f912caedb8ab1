"""Steady-state PES meta-training throughput: inner member-steps per second.

Runs `--steps` outer steps of one MetaTrainer configuration and times each one, leaving out
the steps that compiled something (a task slot's first step on a task not met before, and
the time spent drawing and compiling new slots), so that runs of different lengths and
device counts compare. One JSON line per run on stdout.

    python tools/metatrain_throughput.py --num-tasks 1 --task-names mlp_digits_32_relu_b64_s1
    python tools/metatrain_throughput.py --num-tasks 6 --cpu-devices 1

median_outer_step_cpu_ms is the process's CPU time (all threads) per timed outer step: on a
shared or noisy machine it moves less than the wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lopt_ext.__main__ import add_cpu_devices_option  # noqa: E402
from lopt_ext.metatrain.population import use_cpu_cores  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-tasks", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--unroll", type=int, default=20)
    ap.add_argument("--hidden-size", type=int, default=4)
    ap.add_argument("--lopt-kind", default="small_fc_lopt")
    ap.add_argument("--task-names", nargs="+", default=[])
    ap.add_argument("--horizon", type=int, default=0,
                    help="every trajectory's length (as tools/lo_pes_throughput.py's); default 0: "
                         "MetaTrainConfig's range")
    ap.add_argument("--steps", type=int, default=150, help="outer steps timed (after 3 warm-up steps)")
    add_cpu_devices_option(ap)
    args = ap.parse_args(argv)
    if args.horizon and args.horizon < args.unroll:
        ap.error("argument --horizon: must be >= --unroll")
    for name in ("num_tasks", "pairs", "unroll", "steps"):
        if getattr(args, name) < 1:
            ap.error(f"argument --{name.replace('_', '-')}: must be >= 1")
    devices = use_cpu_cores(args.cpu_devices)
    import numpy as np
    import jax
    from lopt_ext.metatrain.pes import MetaTrainConfig, MetaTrainer
    cfg = MetaTrainConfig(num_tasks=args.num_tasks, pairs=args.pairs, unroll=args.unroll,
                          hidden_size=args.hidden_size, lopt_kind=args.lopt_kind, task_names=tuple(args.task_names),
                          **({"min_horizon": args.horizon, "max_horizon": args.horizon} if args.horizon else {}))
    trainer = MetaTrainer(cfg)
    ms = trainer.init()
    new_slot, drawing = trainer._new_slot, np.zeros(2)  # wall and CPU seconds spent drawing slots

    def timed_new_slot(key, owned=True):  # compilation of a new task's init happens here
        t0, c0 = time.perf_counter(), time.process_time()
        slot = new_slot(key, owned)
        jax.block_until_ready(slot.params)
        drawing[:] += (time.perf_counter() - t0, time.process_time() - c0)
        return slot

    trainer._new_slot = timed_new_slot
    seen, times, cpu_times = set(), [], []
    load0 = os.getloadavg()
    for i in range(args.steps + 3):
        new = {s.spec_index for s in ms.slots} - seen
        seen |= new
        before = drawing.copy()
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.outer_step(ms).result()
        dt, dc = (time.perf_counter() - t0, time.process_time() - c0) - (drawing - before)
        if i >= 3 and not new:
            times.append(dt)
            cpu_times.append(dc)  # all threads: less swayed by scheduling
    times = np.asarray(times)
    members = cfg.num_tasks * 2 * cfg.pairs * cfg.unroll
    out = {"config": {k: getattr(cfg, k) for k in ("num_tasks", "pairs", "unroll", "hidden_size", "lopt_kind",
                                                       "task_names")},
           "devices": devices, "timed_steps": int(times.size), "tasks_met": len(seen),
           "mean_outer_step_ms": float(times.mean() * 1e3), "median_outer_step_ms": float(np.median(times) * 1e3),
           "median_outer_step_cpu_ms": float(np.median(cpu_times) * 1e3),
           "member_steps_per_s": float(members / times.mean()), "load_average_start": load0,
           "load_average_end": os.getloadavg()}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

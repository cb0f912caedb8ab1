"""learned_optimization's own PES on the work `tools/metatrain_throughput.py` times: inner
member-steps per second, one JSON line, for the comparison in docs/metatrain.md (Speed).

The same work: one lopt_ext task (its init, batch sampler and loss, wrapped as a
learned_optimization Task that draws its own batch from the step's key, so no host data
pipeline runs), learned_optimization's AdafacMLPLOpt (= small_fc_lopt) with the same hidden
size, TruncatedPES with ``--pairs`` antithetic pairs (its num_tasks), truncations of
``--unroll`` steps in one jit (steps_per_jit = unroll, antithetic members stacked into one
vmapped call: its fastest single-machine setting), a constant trajectory length, and
SingleMachineGradientLearner's outer Adam. The first 3 outer steps (compilation) are left out,
and so is each step in which the trajectories reach their end and restart, as
metatrain_throughput.py leaves out the time it spends drawing a new slot.

learned_optimization is not a dependency; run it in an environment that has it (as
tools/lo_mlp_lopt_trajectories.py describes):

    PYTHONPATH=/tmp/pk/lo /tmp/lovenv/bin/python tools/lo_pes_throughput.py --steps 100
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lo_compat  # noqa: E402,F401  (before learned_optimization: see tools/lo_compat.py)
import jax  # noqa: E402
import numpy as np  # noqa: E402


def lo_task(task):
    """``task`` (an lopt_ext Task) as a learned_optimization Task without a data pipeline."""
    from learned_optimization.tasks import base as lo_base

    class SameWork(lo_base.Task):
        datasets = None

        def init(self, key):
            return task.init(key)

        def loss(self, params, key, data):
            del data
            return task.loss(params, task.sample_batch(key))

    return SameWork()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task-name", default="mlp_digits_32_relu_b64_s1", help="default: %(default)s")
    ap.add_argument("--pairs", type=int, default=8, help="default: %(default)s")
    ap.add_argument("--unroll", type=int, default=20, help="default: %(default)s")
    ap.add_argument("--horizon", type=int, default=600, help="trajectory length; default: %(default)s")
    ap.add_argument("--hidden-size", type=int, default=4, help="default: %(default)s")
    ap.add_argument("--steps", type=int, default=100, help="outer steps timed; default: %(default)s")
    args = ap.parse_args(argv)
    from learned_optimization.learned_optimizers import adafac_mlp_lopt
    from learned_optimization.optimizers import base as opt_base
    from learned_optimization.outer_trainers import gradient_learner, truncated_pes, truncation_schedule
    from learned_optimization.tasks import base as lo_base
    from lopt_ext.tasks import family

    lopt = adafac_mlp_lopt.AdafacMLPLOpt(hidden_size=args.hidden_size, hidden_layers=2)
    task_family = lo_base.single_task_to_family(lo_task(family.get_task(args.task_name)))
    pes = truncated_pes.TruncatedPES(
        task_family, lopt, truncation_schedule.ConstantTruncationSchedule(args.horizon),
        num_tasks=args.pairs, trunc_length=args.unroll, std=0.01, steps_per_jit=args.unroll,
        stack_antithetic_samples=True)
    learner = gradient_learner.SingleMachineGradientLearner(lopt, [pes], opt_base.Adam(3e-3))
    key = jax.random.PRNGKey(0)
    state = learner.init(key)
    per_trajectory = args.horizon // args.unroll
    times, load0 = [], os.getloadavg()
    for i in range(args.steps + 3):
        key, k = jax.random.split(key)
        t0 = time.perf_counter()
        state, loss, _ = learner.update(state, k)
        jax.block_until_ready((state, loss))
        dt = time.perf_counter() - t0
        # warm-up steps, and restart steps (metatrain_throughput.py times no slot redraw either)
        if i >= 3 and i % per_trajectory != per_trajectory - 1:
            times.append(dt)
    times = np.asarray(times)
    members = 2 * args.pairs * args.unroll
    print(json.dumps({
        "implementation": "learned_optimization", "task": args.task_name, "pairs": args.pairs,
        "unroll": args.unroll, "horizon": args.horizon, "hidden_size": args.hidden_size,
        "devices": len(jax.devices()), "timed_steps": int(times.size),
        "mean_outer_step_ms": float(times.mean() * 1e3), "median_outer_step_ms": float(np.median(times) * 1e3),
        "member_steps_per_s": float(members / times.mean()), "load_average_start": load0,
        "load_average_end": os.getloadavg()}), flush=True)


if __name__ == "__main__":
    main()

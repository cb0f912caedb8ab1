"""Meta-train ScaledSmallFcLOpt's per-tensor scale by a grid search on the meta-training tasks.

    python tools/scale_search.py --out runs/scale_search [--tasks-every 4] [--steps 1000]

PES on this machine's budget turned out too noisy to improve the Adam-like starting rule (see
docs/metatrain.md). This is the low-variance alternative: the rule is
ScaledSmallFcLOpt.adam_like_theta with three coordinates of its scale varied on a grid,
  log_lr  the scale's bias: log(lr / step_mult), the learning-rate level,
  snr     the coefficient of log(RMS(m_0) / sqrt(mean rms)) (3 = Adam; larger shrinks steps
          further when the gradient is noise-dominated: an annealing that follows the task),
  lp      the coefficient of log RMS(p) (s ~ RMS(p)^(lp/3): steps relative to the tensor's scale),
each candidate scored on meta-training MLP tasks only (never the held-out split) by the mean
over tasks of log(final validation loss / loss_scale), validation loss = the task's validation
batches (20-step trailing mean at the last step). All candidates of a task run in one vmapped,
jitted call. Writes OUT/search.json (every score) and OUT/theta.safetensors (the best).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lopt_ext import ScaledSmallFcLOpt, checkpoint  # noqa: E402
from lopt_ext.metatrain import evaluate as ev  # noqa: E402
from lopt_ext.__main__ import add_cpu_devices_option  # noqa: E402
from lopt_ext.metatrain.population import use_cpu_cores  # noqa: E402
from lopt_ext.tasks import family  # noqa: E402

# stage 1: a coarse grid; stage 2: refined around stage 1's best (lr 1e-2, snr 4.5, lp 0), plus
# the coefficient of tanh(t / 1000 - 1) (negative: a time decay of the step, exp(-1.7 |c|) from
# step 0 to 3000).
GRIDS = {
    "coarse": {"log_lr": [float(np.log(x / 1e-3)) for x in (1e-3, 3e-3, 1e-2)], "snr": [3.0, 4.5],
               "lp": [0.0, 1.5], "t1000": [0.0]},
    "refine": {"log_lr": [float(np.log(x / 1e-3)) for x in (5e-3, 1e-2, 2e-2, 4e-2)], "snr": [4.5, 6.0, 7.5],
               "lp": [0.0, 1.0], "t1000": [0.0, -0.7]},
}
T1000 = 5 + 6  # u = [lp, snr_0..2, log size, step features (timescale 1000 is the 7th)]
VALID_BATCHES = 4


def with_coordinates(theta, hp):
    ts = dict(theta["tensor_scale"])
    ts["b"] = jnp.reshape(hp[0], (1,))
    ts["w_lin"] = ts["w_lin"].at[1].set(hp[1]).at[0].set(hp[2]).at[T1000].set(hp[3])
    return dict(theta, tensor_scale=ts)


def validation_task(task):
    """The task with eval_loss replaced by the mean loss over fixed validation batches."""
    keys = [jax.random.PRNGKey(1000 + i) for i in range(VALID_BATCHES)]
    return dataclasses.replace(task, eval_loss=lambda p: jnp.mean(jnp.stack([task.loss(p, task.valid_batch(k))
                                                                            for k in keys])))


def pes_kind(lopt):
    """The meta-training lopt_kind (lopt_ext.variants.KINDS) that builds exactly ``lopt``, None
    when there is none (e.g. progress and horizon inputs together)."""
    from lopt_ext.variants import KINDS
    return next((kind for kind, make in KINDS.items()
                 if make(hidden_size=lopt.hidden_size, hidden_layers=lopt.hidden_layers) == lopt), None)


def write_pes_resume(path, lopt, theta, budget, command, seed=0):
    """A compact resume checkpoint holding ``theta``, so that PES meta-training can continue
    from a searched rule (python -m lopt_ext meta-train --continue-from PATH); returns the
    meta-training configuration it records (scaled, valid_log, outer lr 3e-4)."""
    from jax.flatten_util import ravel_pytree
    from lopt_ext.metatrain import MetaTrainConfig, MetaTrainer, train
    from lopt_ext.metatrain.pes import MetaState
    kind = pes_kind(lopt)
    cfg = MetaTrainConfig(hidden_size=lopt.hidden_size, lopt_kind=kind, objective="valid_log", num_tasks=8,
                          pairs=8, min_horizon=200, max_horizon=3000, outer_lr=3e-4, outer_steps=5000)
    trainer = MetaTrainer(cfg)
    flat = ravel_pytree(theta)[0]
    ms = MetaState(0, flat, trainer.outer_opt.init(flat), [], jax.random.PRNGKey(seed))
    train.save_compact(path, trainer, ms, budget, {"command": command})
    return cfg


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--tasks-every", type=int, default=4, help="use every k-th meta-training MLP task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid", choices=sorted(GRIDS), default="coarse")
    ap.add_argument("--outputs-only", action="store_true",
                    help="do not search: re-write OUT's theta and resume checkpoint from OUT/search.json")
    add_cpu_devices_option(ap)
    args = ap.parse_args(argv)
    use_cpu_cores(args.cpu_devices)
    GRID = GRIDS[args.grid]
    os.makedirs(args.out, exist_ok=True)
    lopt = ScaledSmallFcLOpt(hidden_size=4)
    base = lopt.adam_like_theta(jax.random.PRNGKey(0), 3e-3)
    cands = [list(c) for c in itertools.product(*GRID.values())]
    make_tx = lambda hp: lopt.transform(with_coordinates(base, hp))
    specs = family.TRAIN_MLP_SPECS[:: args.tasks_every]
    scores, per_task, t0 = np.zeros(len(cands)), {}, time.perf_counter()
    previous = None
    if args.outputs_only:  # re-write the outputs of a finished search from its search.json
        with open(os.path.join(args.out, "search.json")) as f:
            previous = json.load(f)
        if previous["candidates"] != cands:
            ap.error(f"argument --outputs-only: {args.out}/search.json was made with another grid")
        specs, scores, per_task = [], np.asarray(previous["scores"]), previous["per_task"]
    for i, spec in enumerate(specs):
        task = validation_task(family.make_task(spec))
        held, _ = ev.run_curves(task, make_tx, cands, [args.seed], args.steps)
        # scored at 1000 steps and at the end (a rule that is good at 1000 and blows up later loses)
        sm = ev.smooth(held[:, 0], ev.EVERY)
        value = 0.0
        horizons = sorted({min(1000, args.steps), args.steps})
        for h in horizons:
            final = sm[:, h // ev.EVERY]
            value = value + np.log(np.clip(np.where(np.isfinite(final), final, np.inf) / task.loss_scale,
                                           1e-6, 2.0)) / len(horizons)
        per_task[task.name] = value.tolist()
        scores += value / len(specs)
        print(f"[{i + 1}/{len(specs)}] {task.name}: best candidate {cands[int(np.argmin(value))]} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    best = int(np.argmin(scores))
    theta = with_coordinates(base, jnp.asarray(cands[best], jnp.float32))
    info = {"command": "python tools/scale_search.py " + " ".join(argv or sys.argv[1:]), "grid": GRID,
            "candidates": cands, "scores": scores.tolist(), "best": cands[best], "per_task": per_task,
            "wall_s": time.perf_counter() - t0, "cpu_count": os.cpu_count(), "steps": args.steps,
            "tasks": list(per_task)}
    if previous is not None:
        info.update(command=previous["command"], wall_s=previous["wall_s"])
    checkpoint.save_theta(os.path.join(args.out, "theta.safetensors"), theta, lopt, info={"search": info["best"]})
    budget = {"wall_s": info["wall_s"], "cpu_hours": info["wall_s"] * (os.cpu_count() or 1) / 3600,
              "outer_steps": 0, "cpu_count": os.cpu_count(),
              "runs": [{"command": info["command"], "wall_s": info["wall_s"], "outer_steps_end": 0}]}
    cfg = write_pes_resume(os.path.join(args.out, "resume.safetensors"), lopt, theta, budget, info["command"],
                           args.seed)
    info["budget"] = budget
    info["config"] = cfg.to_json()
    with open(os.path.join(args.out, "search.json"), "w") as f:
        json.dump(info, f, indent=1)
    for c, s in sorted(zip(cands, scores), key=lambda x: x[1]):
        print(f"  {dict(zip(GRID, c))}: {s:.4f}")
    print(f"best {dict(zip(GRID, cands[best]))}; wrote {args.out}/theta.safetensors, search.json")


if __name__ == "__main__":
    main()

"""A soft early-stopping gate on the validation loss, its two constants chosen on meta-training
tasks, then judged on the held-out split: how far a tuned use of a validation signal gets
where a fixed plateau rule (tools/plateau_probe.py) trades one kind of task for the other.

The gate multiplies the rule's step by exp(-rate * log(L_ema / min L_ema)), L_ema the
bias-corrected moving average (decay ``decay``) of the validation-batch loss it is given every
step (optax's ``value``): steps shrink as the validation loss rises above its best, and a
run that overfits stops. It is not part of any shipped optimizer: the baseline, tuned Adam,
gets no validation signal.

    python tools/validation_gate_probe.py --out runs/gate --adam-cache docs/evaluation/baselines.json

Stage 1: every (rate, decay) of the grid on the 20 meta-training MLPs of tools/scale_es.py x 2
seeds, 1000 steps, scored like the ES search (mean clipped log ratio of the final smoothed
TEST loss of those training tasks to tuned Adam's; the held-out split is not looked at).
Stage 2: the best pair on the held-out split (the evaluation's report in OUT/heldout/).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def validation_gate(rate: float, decay: float):
    """The gate as an optax transformation taking ``value`` (see the module docstring)."""
    import jax.numpy as jnp
    import optax

    def init(params):
        del params
        return {"ema": jnp.zeros((), jnp.float32), "best": jnp.full((), jnp.inf, jnp.float32),
                "count": jnp.zeros((), jnp.int32)}

    def update(updates, state, params=None, *, value, **extra):
        del params, extra
        count = state["count"] + 1
        ema = decay * state["ema"] + (1 - decay) * jnp.asarray(value, jnp.float32)
        ema_hat = ema / (1 - decay ** count.astype(jnp.float32))
        best = jnp.minimum(state["best"], ema_hat)
        above = jnp.log(jnp.maximum(ema_hat, 1e-30) / jnp.maximum(best, 1e-30))
        scale = jnp.exp(-rate * jnp.where(jnp.isfinite(above), above, 0.0))
        updates = optax.tree_utils.tree_scale(scale, updates)
        return updates, {"ema": ema, "best": best, "count": count}

    return optax.GradientTransformationExtraArgs(init, update)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--theta", help="a theta file (default: the shipped default)")
    src.add_argument("--pretrained", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--adam-cache", required=True, help="the held-out split's tuned baselines (copied into OUT)")
    ap.add_argument("--rates", type=float, nargs="+", default=[3.0, 10.0, 30.0])
    ap.add_argument("--decays", type=float, nargs="+", default=[0.95, 0.99])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args(argv)
    if any(not r > 0 for r in args.rates):
        ap.error("argument --rates: must be > 0")
    if any(not 0 < d < 1 for d in args.decays):
        ap.error("argument --decays: must be in (0, 1)")
    if not os.path.isfile(args.adam_cache):
        ap.error(f"argument --adam-cache: no file {args.adam_cache}")

    import numpy as np
    import optax
    from lopt_ext import pretrained, tasks
    from lopt_ext.metatrain import evaluate as ev
    from lopt_ext.tasks import family
    from plateau_probe import prepare_out, write_report
    from scale_es import CLIP, TASKS, adam_baselines, score_task

    cache = prepare_out(args.out, args.adam_cache)
    lopt, theta, source = pretrained.resolve(args.theta, args.pretrained)
    train_tasks = [family.make_task(family.TRAIN_SPECS[i]) for i in TASKS]
    base = adam_baselines(train_tasks, args.seeds, 1000, os.path.join(args.out, "adam_train.json"))
    grid = [(r, d) for r in args.rates for d in args.decays]
    scores = {}
    from tqdm import tqdm
    for rate, decay in tqdm(grid, desc="gate grid", dynamic_ncols=True):
        make_tx = lambda _hp, r=rate, d=decay: optax.chain(lopt.transform(theta), validation_gate(r, d))
        vals = []
        for task in train_tasks:
            held, _ = ev.run_curves(task, make_tx, [0.0], args.seeds, 1000, validation_value=True)
            vals.append(score_task(held, base[task.name], CLIP))
        scores[f"{rate:g},{decay:g}"] = float(np.mean(vals))
    plain = []
    for task in train_tasks:
        held, _ = ev.run_curves(task, lambda _hp: lopt.transform(theta), [0.0], args.seeds, 1000)
        plain.append(score_task(held, base[task.name], CLIP))
    best = min(scores, key=scores.get)
    rate, decay = (float(x) for x in best.split(","))
    print(json.dumps({"scores": scores, "without_gate": float(np.mean(plain)), "best": best}))

    make_tx = lambda _hp: optax.chain(lopt.transform(theta), validation_gate(rate, decay))
    results = ev.evaluate(tasks.list_tasks("test"), lopt, theta, adam_cache=cache, make_tx=make_tx,
                          validation_value=True)
    write_report(args.out, f"{source} + validation gate (rate {rate:g}, decay {decay:g})", lopt, [0, 1, 2],
                 results, "python tools/validation_gate_probe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 grid_scores=scores, without_gate_score=float(np.mean(plain)))

if __name__ == "__main__":
    main()

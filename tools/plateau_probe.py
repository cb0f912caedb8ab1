"""What a validation signal would buy: the evaluation's protocol with the judged optimizer
followed by optax.contrib.reduce_on_plateau on the validation loss.

The learned optimizers lose to tuned Adam on the tiny tabular data sets by overfitting: their
held-out loss is lowest after a few hundred steps and then rises, while tuned Adam picks a
learning rate small enough not to get there by the horizon (docs/metatrain.md). This probe
measures how much of the gap an early-stopping-like signal closes: every step the transformation
receives the loss on a batch of the task's validation split (never trained on, and not the test
data the evaluation judges), averaged over ``--accumulation`` steps; after ``--patience`` such
averages without improvement the step is multiplied by ``--factor``. Tuned Adam, the baseline,
gets no such signal: this is a diagnostic of the missing input, not a fair comparison.

    python tools/plateau_probe.py --pretrained scaled_small_fc_lopt_h4_es --out runs/plateau \\
        --adam-cache docs/evaluation/baselines.json
    python tools/plateau_probe.py --adam 1e-3 --out runs/plateau_adam --adam-cache ...

Writes OUT/evaluation.json and OUT/evaluation.md (the evaluation's report).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--theta", help="a theta file")
    src.add_argument("--pretrained", help="a pretrained entry")
    src.add_argument("--adam", type=float, metavar="LR", help="Adam at this (untuned) learning rate instead")
    ap.add_argument("--out", required=True)
    ap.add_argument("--adam-cache", required=True, help="the tuned baselines' cache (copied into OUT)")
    ap.add_argument("--tasks", nargs="+", default=None, help="default: the held-out split")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--factor", type=float, default=0.5)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--accumulation", type=int, default=5)
    ap.add_argument("--cooldown", type=int, default=0)
    args = ap.parse_args(argv)
    if not 0 < args.factor < 1:
        ap.error("argument --factor: must be in (0, 1)")
    for name in ("patience", "accumulation"):
        if getattr(args, name) < 1:
            ap.error(f"argument --{name}: must be >= 1")
    if args.adam is not None and not args.adam > 0:
        ap.error("argument --adam: must be > 0")
    if not os.path.isfile(args.adam_cache):
        ap.error(f"argument --adam-cache: no file {args.adam_cache}")

    import optax
    from lopt_ext import pretrained, tasks
    from lopt_ext.metatrain import evaluate as ev

    cache = prepare_out(args.out, args.adam_cache)
    plateau = optax.contrib.reduce_on_plateau(factor=args.factor, patience=args.patience,
                                              cooldown=args.cooldown, accumulation_size=args.accumulation)
    if args.adam is not None:
        lopt = theta = None
        source = f"optax.adam({args.adam:g})"
        inner = lambda: optax.adam(args.adam)
    else:
        lopt, theta, source = pretrained.resolve(args.theta, args.pretrained)
        inner = lambda: lopt.transform(theta)
    source += (f" + reduce_on_plateau(validation loss; factor {args.factor:g}, patience {args.patience}, "
               f"accumulation {args.accumulation}, cooldown {args.cooldown})")
    make_tx = lambda _hp: optax.chain(inner(), plateau)
    names = args.tasks or tasks.list_tasks("test")
    results = ev.evaluate(names, lopt, theta, seeds=tuple(args.seeds), adam_cache=cache, make_tx=make_tx,
                          validation_value=True)
    write_report(args.out, source, lopt, args.seeds, results,
                 "python tools/plateau_probe.py " + " ".join(argv if argv is not None else sys.argv[1:]))


def prepare_out(out, adam_cache):
    """One jax CPU device per core, OUT created, the tuned baselines' cache copied into it
    (the probe's runs add nothing to the committed file); returns the copy's path."""
    from lopt_ext.metatrain.population import use_cpu_cores
    use_cpu_cores(None)
    os.makedirs(out, exist_ok=True)
    cache = os.path.join(out, "baselines.json")
    if os.path.abspath(cache) != os.path.abspath(adam_cache):
        shutil.copyfile(adam_cache, cache)
    return cache


def write_report(out, source, lopt, seeds, results, command, **extra):
    """OUT/evaluation.json and evaluation.md, the evaluation's report of ``results``."""
    from lopt_ext import checkpoint
    from lopt_ext.metatrain import evaluate as ev
    from lopt_ext.metatrain.report import render_evaluation
    doc = {"optimizer": source, "lopt": checkpoint.lopt_to_json(lopt) if lopt is not None else None,
           "seeds": list(seeds), "horizons": list(ev.HORIZONS), "protocol": ev.__doc__,
           "summary": ev.summarize(results), "references": ev.reference_summary(results), "results": results,
           "command": command, **extra}
    report = render_evaluation(doc)
    print(report)
    checkpoint.atomic_write_bytes(os.path.join(out, "evaluation.json"), json.dumps(doc).encode())
    with open(os.path.join(out, "evaluation.md"), "w") as f:
        f.write(report + "\n")
    print(f"wrote {out}/evaluation.json and evaluation.md")


if __name__ == "__main__":
    main()

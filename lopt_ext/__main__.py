"""Command line: python -m lopt_ext {demo, meta-train, evaluate, plot} ...

  demo        train a task-family model with the pretrained learned optimizer (fused and
              reference) and with tuned Adam; loss table, step times, memory, PNG
  meta-train  PES meta-training of small_fc_lopt on the offline task family (checkpoints, --resume)
  evaluate    pretrained (or any theta) vs Adam with a learning-rate sweep on held-out tasks
  plot        meta-loss vs outer step (PNG) from a meta-train log.jsonl
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys


def _add_metatrain(sub):
    from lopt_ext.metatrain import MetaTrainConfig
    p = sub.add_parser("meta-train", help="PES meta-training on the offline task family")
    p.add_argument("--out", required=True, help="output / checkpoint directory")
    p.add_argument("--resume", action="store_true", help="continue from OUT's latest checkpoint")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--time-budget", type=float, default=None, help="stop (with a checkpoint) after this many seconds")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-time-inner", action="store_true", help="skip the fused vs reference timing at the end")
    for f in dataclasses.fields(MetaTrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "task_names":
            p.add_argument(flag, nargs="*", default=None, help="meta-train on these task names instead of --split")
        else:
            p.add_argument(flag, type=type(f.default), default=None, help=f"(default {f.default})")
    return p


def cmd_metatrain(args):
    from lopt_ext.metatrain import MetaTrainConfig, train
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(MetaTrainConfig)
                 if getattr(args, f.name) is not None}
    cfg = None if (args.resume and not overrides) else MetaTrainConfig(**overrides)
    if cfg is None:
        ckpt_dir = train.latest_checkpoint(args.out)
        if ckpt_dir is None:
            cfg = MetaTrainConfig()
    command = "python -m lopt_ext " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    summary = train.run(cfg, args.out, resume=args.resume, checkpoint_every=args.checkpoint_every,
                        progress=not args.no_progress, command=command, time_inner=not args.no_time_inner,
                        time_budget_s=args.time_budget)
    print(json.dumps({k: v for k, v in summary.items() if k != "provenance"}, indent=1))


def _add_others(sub):
    p = sub.add_parser("demo", help="pretrained learned optimizer vs tuned Adam on one task (minutes)")
    p.add_argument("--task", default="mlp_digits_48_relu_b64_s1", help="a task name (see `tasks`)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", default="demo.png")
    p.add_argument("--pretrained", default="small_fc_lopt_h4")

    p = sub.add_parser("evaluate", help="learned optimizer vs Adam (lr sweep) on held-out tasks")
    p.add_argument("--theta", default=None, help="theta .safetensors (default: the shipped pretrained one)")
    p.add_argument("--pretrained", default="small_fc_lopt_h4")
    p.add_argument("--tasks", nargs="*", default=None, help="task names (default: test split + outside tasks)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--impl", default="fused", choices=["fused", "reference"])
    p.add_argument("--adam-cache", default=None, help="JSON cache of Adam sweeps (theta-independent)")
    p.add_argument("--adam-only", action="store_true", help="only fill the Adam cache")
    p.add_argument("--json", default="evaluation.json")
    p.add_argument("--png", default="evaluation.png")
    p.add_argument("--markdown", default=None, help="also write the table to this file")

    p = sub.add_parser("plot", help="meta-loss vs outer step PNG from a meta-train log")
    p.add_argument("log", help="OUT/log.jsonl of a meta-train run (or the OUT directory)")
    p.add_argument("--png", default="metaloss.png")
    p.add_argument("--window", type=int, default=50)

    sub.add_parser("tasks", help="list the task family by split")


def cmd_demo(args):
    from lopt_ext.metatrain import demo
    demo.run_demo(args.task, steps=args.steps, seed=args.seed, png=args.png, pretrained_name=args.pretrained)


def cmd_evaluate(args):
    from lopt_ext import checkpoint, pretrained, tasks
    from lopt_ext.metatrain import evaluate as ev
    names = args.tasks or (tasks.list_tasks("test") + tasks.list_tasks("outside"))
    if args.adam_only:
        ev.evaluate(names, None, None, seeds=tuple(args.seeds), steps=args.steps, every=args.every,
                    adam_cache=args.adam_cache, adam_only=True)
        return
    if args.theta:
        lopt, theta = checkpoint.load_theta(args.theta)
    else:
        lopt, theta = pretrained.load(args.pretrained)
    results = ev.evaluate(names, lopt, theta, seeds=tuple(args.seeds), steps=args.steps, every=args.every,
                          impl=args.impl, adam_cache=args.adam_cache)
    table = ev.format_table(results)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)
    if args.png:
        ev.plot_curves(results, args.png)
        print(f"wrote {args.png}")


def cmd_plot(args):
    import os
    from lopt_ext.metatrain import demo
    log = os.path.join(args.log, "log.jsonl") if os.path.isdir(args.log) else args.log
    print(json.dumps(demo.plot_metaloss(log, args.png, args.window)))
    print(f"wrote {args.png}")


def cmd_tasks(args):
    from lopt_ext import tasks
    for split in tasks.SPLITS:
        for name in tasks.list_tasks(split):
            print(f"{split:8s} {name}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lopt_ext", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_metatrain(sub)
    _add_others(sub)
    args = parser.parse_args(argv)
    handlers = {"meta-train": cmd_metatrain, "demo": cmd_demo, "evaluate": cmd_evaluate, "plot": cmd_plot,
                "tasks": cmd_tasks}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

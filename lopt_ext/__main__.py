"""Command line of lopt_ext: python -m lopt_ext COMMAND [options]; `--help` lists the commands.

Each command's one-line description lives in the parser below (argparse prints it in the
command list and as the command's own description), so it is written once.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time

PROG = "python -m lopt_ext"
TASKS_HINT = f"`{PROG} tasks` lists them"


# ----------------------------------------------------------------------------- parser machinery
# Reusable by every command: a formatter that shows defaults without "(default: None)" noise,
# and argparse types whose errors read "error: argument --steps: must be a positive integer ...".

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" unless the help already says what the default means or there is
    nothing to show (None, False of a flag, "", an empty list)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if ("%(default)" in text or "default:" in text or d is None or d is False or d is argparse.SUPPRESS
                or (isinstance(d, (str, list, tuple)) and len(d) == 0)):
            return text
        return super()._get_help_string(action)


class _RawDescriptionFormatter(_HelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _number(text: str, kind, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = _number(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    value = _number(text, int, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text, float, "a positive number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number (> 0), got {value:g}")
    return value


def _nonnegative_float(text: str) -> float:
    value = _number(text, float, "a number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {value:g}")
    return value


def _task_name(text: str) -> str:
    """A task name of any split; the error names a few and points at `tasks` for the rest."""
    from lopt_ext import tasks
    names = tasks.list_tasks()
    if text not in names:
        raise argparse.ArgumentTypeError(f"unknown task {text!r} ({TASKS_HINT}; e.g. {', '.join(names[:2])})")
    return text


def _output_file(text: str) -> str:
    """A file to write: its directory must already exist (checked before anything runs)."""
    parent = os.path.dirname(os.path.abspath(text))
    if not text or os.path.isdir(text) or not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: not a file path in an existing directory")
    return text


def _input_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


def _metatrain_log(text: str) -> str:
    """A meta-train log.jsonl, or the OUT directory holding one."""
    path = os.path.join(text, "log.jsonl") if os.path.isdir(text) else text
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"no meta-train log at {text!r} (give OUT/log.jsonl or the OUT directory)")
    return text


def _output_dir(text: str) -> str:
    """A directory to create or reuse (checked before anything runs, created only when used)."""
    if not text or os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"cannot write into {text!r}: it is a file")
    parent = os.path.dirname(os.path.abspath(text))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot create {text!r}: {parent!r} is not writable")
    return text


def _pretrained_names():
    from lopt_ext import pretrained
    return pretrained.list_pretrained()


def _compare_entry(text: str) -> str:
    if text in _pretrained_names() + ["celo"] or os.path.isfile(text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is neither a shipped optimizer ({', '.join(_pretrained_names())}, "
                                     f"celo) nor an existing theta file")


def _splits():
    from lopt_ext import tasks
    return list(tasks.SPLITS)


class _VersionAction(argparse.Action):
    """--version: the package version and which compiled kernel modules are installed."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())  # stdout, as argparse's own "version" action
        parser.exit()


def version_text() -> str:
    import importlib.util
    import lopt_ext
    text = f"lopt_ext {lopt_ext.__version__}"
    try:
        from importlib import metadata
        installed = metadata.version("lopt_ext")
        if installed != lopt_ext.__version__:
            text += f" (installed distribution: {installed})"
    except Exception:  # not installed (a bare source checkout)
        text += " (not installed)"
    built = [name for name, mod in (("CPU", "lopt_ext._lopt_cpu"), ("CUDA", "lopt_ext._lopt_cuda"))
             if importlib.util.find_spec(mod) is not None]
    return text + f"; compiled kernels: {', '.join(built) if built else 'none'}"


def add_cpu_devices_option(p):
    """--cpu-devices N, for every command or tool that steps populations of training runs; apply it
    with lopt_ext.metatrain.population.use_cpu_cores(args.cpu_devices) before jax starts."""
    p.add_argument("--cpu-devices", type=_positive_int, default=None, metavar="N",
                   help="CPU devices jax spreads each population of training runs over "
                        "(lopt_ext.metatrain.population; default: one per usable core; 1: one device). "
                        "Results differ at float32 round-off between counts")


def _use_cpu_devices(args):
    if hasattr(args, "cpu_devices"):
        from lopt_ext.metatrain.population import use_cpu_cores
        use_cpu_cores(args.cpu_devices)


# ----------------------------------------------------------------------------- meta-train
# Help and parse-time validation for each MetaTrainConfig field: {field: (help, argparse kwargs)}.
# A field added to MetaTrainConfig later still gets an option (typed like its default).
def _metatrain_fields():
    from lopt_ext.metatrain.pes import LOPT_KINDS, OBJECTIVES
    from lopt_ext.update import IMPLS
    return {
        "hidden_size": ("hidden width H of the learned optimizer's MLP", dict(type=_positive_int)),
        "hidden_layers": ("hidden layers of the learned optimizer's MLP", dict(type=_positive_int)),
        "num_tasks": ("task slots in the population, each a task drawn from the split", dict(type=_positive_int)),
        "pairs": ("antithetic perturbation pairs per task slot (2*PAIRS members run vmapped)",
                  dict(type=_positive_int)),
        "unroll": ("inner steps per truncation (one outer step)", dict(type=_positive_int)),
        "min_horizon": ("shortest inner trajectory, in inner steps (multiple of --unroll)", dict(type=_positive_int)),
        "max_horizon": ("longest inner trajectory, in inner steps", dict(type=_positive_int)),
        "sigma": ("standard deviation of the theta perturbations", dict(type=_positive_float)),
        "outer_lr": ("peak learning rate of the outer Adam (warmup, then cosine decay)", dict(type=_positive_float)),
        "outer_steps": ("outer (meta-gradient) steps in total", dict(type=_positive_int)),
        "warmup_steps": ("linear warmup of the outer learning rate, in outer steps", dict(type=_nonnegative_int)),
        "final_lr_fraction": ("outer learning rate at the last step, as a fraction of --outer-lr",
                              dict(type=_nonnegative_float)),
        "grad_clip": ("global-norm clip of the meta-gradient", dict(type=_positive_float)),
        "loss_clip": ("clip of each inner step's normalised loss (bounds diverging members)",
                      dict(type=_positive_float)),
        "estimator": ("meta-gradient estimator: pes (persistent ES, accumulates the perturbations over "
                      "the trajectory) or es (truncated ES, per unroll)", dict(choices=["pes", "es"])),
        "impl": ("inner-step implementation: the fused kernel or the pure-JAX reference",
                 dict(choices=list(IMPLS))),
        "split": ("task split to meta-train on (ignored with --task-names)", dict(choices=_splits())),
        "objective": ("per-inner-step meta-objective: training-batch loss/scale (normalized), "
                      "log(loss/scale) (log), or log(validation-batch loss/scale) after the step (valid_log)",
                      dict(choices=list(OBJECTIVES))),
        "lopt_kind": ("learned optimizer (lopt_ext.variants.KINDS): small_fc_lopt, scaled (small_fc_lopt "
                      "with a learned per-tensor step scale), scaled_progress (scaled plus progress inputs and a "
                      "learned weight decay), scaled_horizon (scaled plus the fraction of the trajectory's horizon "
                      "done: a learned schedule), scaled_horizon_loss (scaled_horizon plus what the minibatch loss has done), "
                      "scaled_horizon_loss_gap (plus a validation batch's loss: the generalisation gap), "
                      "the small_fc_lopt ablations "
                      "small_fc_lopt_no_adafactor and small_fc_lopt_1m1r, or mlp_lopt (MLPLOpt)",
                      dict(choices=list(LOPT_KINDS))),
        "seed": ("seed of the initial theta, the task draws and the perturbations", dict(type=_nonnegative_int)),
    }


def _add_metatrain(sub):
    from lopt_ext.metatrain import MetaTrainConfig
    p = sub.add_parser("meta-train", help="PES meta-training of small_fc_lopt on the offline task family "
                                          "(atomic checkpoints; --resume continues bit for bit)")
    p.add_argument("--out", required=True, metavar="DIR", help="output and checkpoint directory (created)")
    p.add_argument("--resume", action="store_true", help="continue from DIR's latest checkpoint")
    p.add_argument("--continue-from", type=_input_file, default=None, metavar="PATH",
                   help="continue the meta-training saved in a compact resume checkpoint (e.g. "
                        "lopt_ext/pretrained/NAME.resume.safetensors): theta, outer optimizer, schedule and "
                        "RNG; fresh task slots; its config unless options here change it (default: start fresh)")
    p.add_argument("--checkpoint-every", type=_positive_int, default=50, metavar="N",
                   help="write a checkpoint every N outer steps")
    p.add_argument("--time-budget", type=_nonnegative_float, default=None, metavar="SECONDS",
                   help="stop (with a checkpoint) after this many seconds (default: no limit)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-time-inner", action="store_true", help="skip the fused vs reference timing at the end")
    p.add_argument("--num-processes", type=_positive_int, default=None, metavar="N",
                   help="meta-train in N processes (jax.distributed; each steps its share of the task slots, "
                        "process 0 writes; lopt_ext.metatrain.distributed) (default: one process)")
    p.add_argument("--process-id", type=_nonnegative_int, default=None, metavar="I",
                   help="with --num-processes: this process's index, 0 .. N-1 (default: none, required with --num-processes)")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="with --num-processes: process 0's address, the same for every process "
                        "(e.g. localhost:12355) (default: none, required with --num-processes)")
    add_cpu_devices_option(p)
    known = _metatrain_fields()
    for f in dataclasses.fields(MetaTrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "task_names":
            p.add_argument(flag, nargs="+", type=_task_name, default=None, metavar="TASK",
                           help=f"meta-train on these tasks instead of --split ({TASKS_HINT}) "
                                "(default: the tasks of --split)")
        elif f.name == "train_only":
            p.add_argument(flag, nargs="+", default=None, metavar="ENTRY",
                           help="meta-train only these theta entries (tree paths joined by '/', e.g. "
                                "tensor_scale/w_lin tensor_scale/b); the rest keeps its initial value "
                                "(default: all of theta)")
        elif f.name == "init_theta":
            p.add_argument(flag, type=_input_file, default=None, metavar="PATH",
                           help="theta .safetensors to start from (default: a random theta, "
                                "SmallFcLOpt.init_theta seeded by --seed)")
        else:
            text, kwargs = known.get(f.name, (f"MetaTrainConfig.{f.name}", dict(type=type(f.default))))
            if "choices" in kwargs:
                kwargs = dict(kwargs, metavar="{" + ",".join(kwargs["choices"]) + "}")
            # default=None marks "not given" (so --resume alone keeps the checkpoint's config)
            p.add_argument(flag, default=None, help=f"{text} (default: {f.default})", **kwargs)
    p.set_defaults(_parser=p)
    return p


def _start_processes(args):
    """jax.distributed for meta-train --num-processes (before jax starts its backend)."""
    given = [a for a in ("num_processes", "process_id", "coordinator") if getattr(args, a, None) is not None]
    if not given:
        return
    p = args._parser
    if len(given) != 3:
        p.error("arguments --num-processes, --process-id and --coordinator go together")
    if args.process_id >= args.num_processes:
        p.error(f"argument --process-id: must be below --num-processes ({args.num_processes}), got {args.process_id}")
    if args.resume and args.num_processes > 1:
        p.error("argument --resume: a run of several processes writes compact checkpoints; continue it with "
                "--continue-from OUT/resume.safetensors")
    from lopt_ext.metatrain import distributed
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)


def cmd_metatrain(args):
    from lopt_ext.metatrain import MetaTrainConfig, train
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(MetaTrainConfig)
                 if getattr(args, f.name) is not None}
    try:  # cross-field checks (e.g. unroll <= min_horizon <= max_horizon) before anything is written
        if args.continue_from:
            cfg = dataclasses.replace(train.compact_config(args.continue_from), **overrides)
        else:
            cfg = None if (args.resume and not overrides) else MetaTrainConfig(**overrides)
        if cfg is not None:
            cfg.lopt()
            from lopt_ext.metatrain.pes import trainable_mask
            trainable_mask(cfg)
    except (TypeError, ValueError) as e:
        args._parser.error(str(e))
    if cfg is None:
        ckpt_dir = train.latest_checkpoint(args.out)
        if ckpt_dir is None:
            cfg = MetaTrainConfig()
    command = "python -m lopt_ext " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if cfg is not None and args.num_processes and cfg.num_tasks < args.num_processes:
        args._parser.error(f"argument --num-tasks: must be at least --num-processes ({args.num_processes})")
    summary = train.run(cfg, args.out, resume=args.resume, checkpoint_every=args.checkpoint_every,
                        progress=not args.no_progress, command=command, time_inner=not args.no_time_inner,
                        time_budget_s=args.time_budget, continue_from=args.continue_from)
    if summary.get("processes", 1) == 1 or args.process_id == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "provenance"}, indent=1))


# ----------------------------------------------------------------------------- demo, evaluate, plot, tasks

DEMO_TASK = "mlp_digits_48_relu_b64_s1"
QUICK_EVAL_TASKS = 3  # evaluate --quick: this many of the split's smallest tasks


def _add_others(sub):
    p = sub.add_parser("demo", help="the pretrained learned optimizer (fused and reference) vs Adam tuned by an "
                                    "lr sweep on one task: losses, step times, state memory (under a minute)")
    p.add_argument("--task", type=_task_name, default=DEMO_TASK, metavar="TASK",
                   help=f"task to train ({TASKS_HINT})")
    p.add_argument("--steps", type=_positive_int, default=1000, metavar="N", help="training steps per run")
    p.add_argument("--seed", type=_nonnegative_int, default=0, help="seed of the initial params and batches")
    p.add_argument("--png", type=_output_file, default=None, metavar="PATH",
                   help="also plot held-out loss vs step to this PNG (default: no picture is written)")
    p.add_argument("--pretrained", default=None, choices=_pretrained_names(),
                   help="shipped learned optimizer to use (default: the best one, pretrained.load())")

    p = sub.add_parser("evaluate", help="learned optimizers vs Adam tuned per task (constant lr, or warmup then cosine "
                                        "decay) and untuned Adam, in the field's views (held out and training "
                                        "loss, time to target) at several horizons")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--theta", type=_input_file, default=None, metavar="PATH",
                     help="theta .safetensors, or a Celo theta.state, to evaluate (default: the shipped "
                          "pretrained optimizer)")
    src.add_argument("--pretrained", default=None, choices=_pretrained_names() + ["celo"],
                     help="shipped learned optimizer to evaluate (default: the best one, pretrained.load()); "
                          "celo: Celo's published weights (from the cache or huggingface_hub; or pass --theta)")
    p.add_argument("--split", default="test", choices=_splits(),
                   help="task split to evaluate on (test: the held-out in-family MLPs that are judged)")
    p.add_argument("--tasks", nargs="+", type=_task_name, default=None, metavar="TASK",
                   help=f"these tasks instead of --split ({TASKS_HINT})")
    p.add_argument("--seeds", nargs="+", type=_nonnegative_int, default=None, metavar="SEED",
                   help="seeds of the initial params and batch streams (default: 0 1 2; with --quick 0)")
    p.add_argument("--horizons", nargs="+", type=_horizon, default=None, metavar="STEPS",
                   help="training horizons judged (multiples of 100; Adam is tuned for each; default: 1000 3000; "
                        "with --quick 500)")
    p.add_argument("--quick", action="store_true",
                   help=f"a first look in about 30 s on 2 cores: the {QUICK_EVAL_TASKS} smallest tasks of the split, "
                        "seed 0, 500 steps (explicit --tasks/--seeds/--horizons win); the full default run takes "
                        "about 10 minutes per optimizer here, plus about 6 for the Adam sweeps the first time (an "
                        "estimate is printed after the first task)")
    p.add_argument("--impl", default="fused", choices=["fused", "reference"],
                   help="learned optimizer implementation")
    p.add_argument("--out", type=_output_dir, default=os.path.join("runs", "evaluate"), metavar="DIR",
                   help="writes evaluation.json, evaluation.md, evaluation.png and views.png here (created)")
    p.add_argument("--adam-cache", type=_output_file, default=None, metavar="PATH",
                   help="JSON cache of the tuned-Adam runs, which do not depend on theta "
                        "(default: DIR/baselines.json)")
    p.add_argument("--compare", nargs="+", type=_compare_entry, default=None, metavar="OPTIMIZER",
                   help="also evaluate these learned optimizers in the same views: shipped names, celo, "
                        "or theta files")
    p.add_argument("--adam-only", action="store_true", help="only run (and cache) the Adam baselines")
    p.add_argument("--no-plot", action="store_true", help="do not write evaluation.png and views.png")
    add_cpu_devices_option(p)

    p = sub.add_parser("plot", help="meta-loss vs outer step (PNG) from a meta-train log.jsonl")
    p.add_argument("log", type=_metatrain_log, help="OUT/log.jsonl of a meta-train run, or the OUT directory")
    p.add_argument("--png", type=_output_file, default=None, metavar="PATH",
                   help="PNG to write (default: metaloss.png next to the log)")
    p.add_argument("--window", type=_positive_int, default=50, metavar="N",
                   help="moving-average window, in outer steps")

    p = sub.add_parser("tasks", help="list the offline task family, one 'split name' per line")
    p.add_argument("--split", default=None, choices=_splits(), help="only this split (default: every split)")


def cmd_demo(args):
    from lopt_ext.metatrain import demo
    t0 = time.perf_counter()
    demo.run_demo(args.task, steps=args.steps, seed=args.seed, png=args.png, pretrained_name=args.pretrained)
    print(f"demo took {time.perf_counter() - t0:.1f} s")


def _rounded(obj, digits=6):
    """A JSON tree with floats at ``digits`` significant digits (the curves are most of the file)."""
    if isinstance(obj, float):  # non-finite -> null (strict JSON; in the views, null = never: infinite)
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v, digits) for v in obj]
    return obj


def _contender_name(source: str) -> str:
    """How an evaluated optimizer is named in the views: the shipped name, or the file's stem."""
    if source.startswith("pretrained:"):
        return source.split(":", 1)[1]
    return os.path.splitext(os.path.basename(source))[0]


def cmd_evaluate(args):
    from lopt_ext import checkpoint, pretrained, tasks
    from lopt_ext.metatrain import evaluate as ev
    names = args.tasks or tasks.list_tasks(args.split)
    if args.quick and not args.tasks:
        names = sorted(names, key=lambda n: (ev.task_cost(tasks.get_task(n)), n))[:QUICK_EVAL_TASKS]
    seeds = tuple(args.seeds if args.seeds is not None else [0] if args.quick else [0, 1, 2])
    horizons = tuple(sorted(set(args.horizons if args.horizons is not None else [500] if args.quick else [1000, 3000])))
    os.makedirs(args.out, exist_ok=True)
    cache = args.adam_cache or os.path.join(args.out, "baselines.json")
    print(f"evaluate: {len(names)} task(s) x {len(seeds)} seed(s), horizons {' '.join(map(str, horizons))}; "
          f"Adam tuned over {len(ev.DEFAULT_LRS)} learning rates x {len(ev.BASELINES)} schedules per task "
          f"(cached runs reused from {cache})", flush=True)
    if args.adam_only:
        ev.evaluate(names, None, None, seeds=seeds, horizons=horizons, adam_cache=cache, adam_only=True)
        print(f"wrote {cache}")
        return
    resolved = {}
    for entry in [None] + list(args.compare or []):
        try:
            if entry is None:
                lopt_e, theta_e, src = pretrained.resolve(args.theta, args.pretrained)
            elif os.path.isfile(entry):
                lopt_e, theta_e, src = pretrained.resolve(entry, None)
            else:
                lopt_e, theta_e, src = pretrained.resolve(None, entry)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"{PROG} evaluate: error: {'--compare ' + entry + ': ' if entry else ''}{e}") from None
        resolved.setdefault(_contender_name(src), (lopt_e, theta_e, src))
    runs = {}
    for key, (lopt_e, theta_e, src) in resolved.items():
        print(f"evaluate: {key}", flush=True)
        runs[key] = ev.evaluate(names, lopt_e, theta_e, seeds=seeds, horizons=horizons, impl=args.impl,
                                adam_cache=cache)
    primary = next(iter(resolved))
    lopt, _, source = resolved[primary]
    results = runs[primary]
    from lopt_ext.metatrain.report import render_evaluation
    doc = {"optimizer": source, "lopt": checkpoint.lopt_to_json(lopt), "seeds": list(seeds),
           "horizons": list(horizons), "protocol": ev.__doc__,
           "views": ev.evaluate_views(runs, horizons, adam_cache=cache, primary=primary),
           "summary": ev.summarize(results, horizons),
           "references": ev.reference_summary(results, horizons), "results": results,
           "compared": {k: {"optimizer": resolved[k][2], "lopt": checkpoint.lopt_to_json(resolved[k][0]),
                            "results": [{c: r[c] for c in ("task", "lopt_curve", "lopt_train_curve", "lopt_time_s")}
                                        for r in runs[k]]}
                        for k in list(runs)[1:]}}
    report = render_evaluation(doc)
    print(report)
    path = os.path.join(args.out, "evaluation.json")
    checkpoint.atomic_write_bytes(path, json.dumps(_rounded(doc)).encode())
    with open(os.path.join(args.out, "evaluation.md"), "w") as f:
        f.write(report + "\n")
    print(f"wrote {path} and evaluation.md")
    if not args.no_plot:
        ev.plot_curves(results, os.path.join(args.out, "evaluation.png"))
        ev.plot_views(doc["views"], os.path.join(args.out, "views.png"))
        print(f"wrote {os.path.join(args.out, 'evaluation.png')} and views.png")


def cmd_plot(args):
    from lopt_ext.metatrain import demo
    log = os.path.join(args.log, "log.jsonl") if os.path.isdir(args.log) else args.log
    png = args.png or os.path.join(os.path.dirname(os.path.abspath(log)), "metaloss.png")
    print(json.dumps(demo.plot_metaloss(log, png, args.window)))
    print(f"wrote {png}")


def cmd_tasks(args):
    from lopt_ext import tasks
    for split in tasks.SPLITS:
        if args.split in (None, split):
            for name in tasks.list_tasks(split):
                print(f"{split:8s} {name}")


# ----------------------------------------------------------------------------- tradeoffs

def _tradeoffs_name(text: str) -> str:
    """An optimizer of the tradeoffs study (hand-designed or lopt_ext.variants.STUDY)."""
    from lopt_ext import tradeoffs
    names = tradeoffs.study_names()
    if text not in names:
        raise argparse.ArgumentTypeError(f"unknown optimizer {text!r} (choose from {', '.join(names)})")
    return text


def _horizon(text: str) -> int:
    from lopt_ext.metatrain.evaluate import TRAIN_EVERY
    value = _positive_int(text)
    if value % TRAIN_EVERY:
        raise argparse.ArgumentTypeError(f"must be a multiple of {TRAIN_EVERY}, got {value}")
    return value


def _input_dir(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"no such directory: {text!r}")
    return text


def _add_tradeoffs(sub):
    from lopt_ext import tradeoffs
    p = sub.add_parser("tradeoffs", help="memory, compute and performance of the learned optimizers "
                                         "(fused and unfused) and of SGD, momentum, Adam and Adafactor "
                                         "(Metz et al. 2022's study): JSON, table and Pareto plots")
    p.add_argument("--quick", action="store_true",
                   help="a CI-sized run (well under 2 minutes): untrained thetas, the 2 smallest held-out "
                        "tasks, seed 0, 200 steps, timing at 1e4/1e5 parameters")
    p.add_argument("--out", type=_output_dir, default=None, metavar="DIR",
                   help="writes tradeoffs.json, tradeoffs.md, pareto_time.png, pareto_memory.png and (in DIR/cache) the "
                        f"sweep caches here (default: {tradeoffs.DEFAULT_OUT}; with --quick {tradeoffs.QUICK_OUT}; the "
                        f"committed results are refreshed only when asked for: --out {tradeoffs.COMMITTED_OUT})")
    p.add_argument("--only", nargs="+", type=_tradeoffs_name, default=None, metavar="NAME",
                   help="measure only these optimizers (default: all of "
                        f"{', '.join(tradeoffs.HAND_DESIGNED)} and lopt_ext.variants.STUDY)")
    p.add_argument("--seeds", nargs="+", type=_nonnegative_int, default=None, metavar="SEED",
                   help="seeds of the initial params and batch streams (default: 0 1 2; with --quick 0)")
    p.add_argument("--horizon", type=_horizon, default=None, metavar="STEPS",
                   help="training steps judged, a multiple of 100 (default: 1000; with --quick 200)")
    p.add_argument("--repeats", type=_positive_int, default=None, metavar="N",
                   help="timed calls per step-time measurement, median reported (default: 7; with --quick 3)")
    p.add_argument("--theta-dir", type=_input_dir, default=None, metavar="DIR",
                   help="where the learned optimizers' NAME.safetensors are read (default: the trained thetas "
                        "shipped in lopt_ext/tradeoffs/theta; not read with --quick)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(_parser=p)
    return p


def cmd_tradeoffs(args):
    from lopt_ext import tradeoffs
    theta_dir = args.theta_dir or tradeoffs.THETA_DIR
    out = args.out or (tradeoffs.QUICK_OUT if args.quick else tradeoffs.DEFAULT_OUT)
    names = [n for n in tradeoffs.study_names() if not args.only or n in args.only]
    if not args.quick:  # every theta file must be there before anything runs or is written
        missing = tradeoffs.missing_thetas(names, theta_dir)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            args._parser.error(f"missing theta file {os.path.relpath(missing[0])}{more}: meta-train the study "
                               "variants first (or use --quick for untrained thetas)")
        for n in names:
            if n not in tradeoffs.HAND_DESIGNED:
                try:
                    tradeoffs.load_learned(n, False, theta_dir)
                except Exception as e:  # a damaged or mismatched file: one line naming it
                    args._parser.error(f"cannot use theta file {os.path.relpath(tradeoffs.theta_path(n, theta_dir))}: "
                                       f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
    command = "python -m lopt_ext " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    t0 = time.perf_counter()
    doc = tradeoffs.run_study(out, quick=args.quick, only=args.only, seeds=args.seeds, horizon=args.horizon,
                              repeats=args.repeats, theta_dir=theta_dir,
                              progress=not args.no_progress and not args.quick, command=command)
    print(tradeoffs.render_markdown(doc))
    print(f"wrote {os.path.join(out, 'tradeoffs.json')}, tradeoffs.md, pareto_time.png and pareto_memory.png "
          f"in {time.perf_counter() - t0:.1f} s")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, formatter_class=_RawDescriptionFormatter, description=(
        "lopt_ext: the small_fc_lopt learned optimizer as fused XLA kernels for JAX.\n"
        "Commands: demo, tasks, meta-train, evaluate, plot, tradeoffs (described below);\n"
        f"`{PROG} COMMAND --help` shows a command's options and defaults."))
    parser.add_argument("--version", action=_VersionAction,
                        help="print the lopt_ext version and the compiled kernels installed, and exit")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND",
                                parser_class=_Parser)
    _add_others(sub)
    _add_metatrain(sub)
    _add_tradeoffs(sub)
    # one description per command: the list entry is also the command's own --help description
    for name, action in sub.choices.items():
        if action.description is None:
            action.description = next(a.help for a in sub._choices_actions if a.dest == name)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    handlers = {"meta-train": cmd_metatrain, "demo": cmd_demo, "evaluate": cmd_evaluate, "plot": cmd_plot,
                "tasks": cmd_tasks, "tradeoffs": cmd_tradeoffs}
    if args.command == "meta-train":
        _start_processes(args)
    _use_cpu_devices(args)
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

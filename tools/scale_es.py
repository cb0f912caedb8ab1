"""Meta-train ScaledSmallFcLOpt's per-tensor scale by evolution strategies against tuned Adam.

    python tools/scale_es.py --out runs/scale_es [--from-pretrained scaled_small_fc_lopt_h4]
                             [--generations 12] [--pairs 8] [--sigma 0.5] [--time-budget S]

The objective is the evaluation's own, on meta-training tasks only (never the held-out split):
for every task-seed, log(final smoothed validation loss of the candidate / that of Adam tuned
per task over the evaluation's 7 learning rates), clipped to [-1, 3] (non-finite: 3), averaged
over task-seeds. It is normalised per task (a task with a large loss cannot dominate) and it
judges the loss on validation batches, which the rule never trains on, at the evaluation's
horizon. --objective-views scores the evaluation's own views instead (e.g. best_heldout
train_final: the mean of the clipped log ratios of the best validation loss and of the final
training loss, each against Adam tuned on it; views.py). The search moves the scale's linear coefficients (``tensor_scale/w_lin`` on the 16
statistics of lopt_ext.scaled, and the bias ``b``) and, with --coordinates scale+decays, the
momentum and rms decays; the per-element MLP stays as it starts. --progress-inputs gives the rule
the progress inputs and learned weight decay of ScaledSmallFcLOpt(progress_inputs=True) (zero
weights, decay off or at --decay-start), and --coordinates progress moves only their
coefficients and the two biases. --horizon-inputs gives it the horizon inputs of
ScaledSmallFcLOpt(horizon_inputs=True) (zero weights: the same rule; every run is told its
length, --steps), and --coordinates horizon moves only their coefficients and the scale's bias:
a learned schedule over the fraction of training done. --loss-inputs train|validation gives it
the loss inputs (what the minibatch or a validation-batch loss has done; zero weights), and
--coordinates loss (or horizon+loss) moves their coefficients and the bias;
--loss-inputs train+validation adds the validation loss's gap inputs (--coordinates
horizon+loss+gap moves all three groups). --augment-reparam R searches on reparameterised copies
of the tasks instead (lopt_ext.tasks.augment: each parameter tensor stored divided by a fixed
factor 10**U(-R, R); Adam is tuned on the copies too).

Each generation evaluates the mean and ``pairs`` antithetic perturbations on every task in one
vmapped, jitted call per task (common random numbers: the same seeds and batches for every
candidate), then moves the mean by the rank-weighted perturbations that beat it (a separable,
elitist evolution strategy; sigma shrinks by --sigma-decay per generation, twice when no
perturbation beats the mean). The best
mean seen so far (by its score; the mean rather than the luckiest perturbation, which the
selection among many noisy scores would favour) is written after every generation, so a stopped
run keeps its result; --resume continues the search, and the budget adds up from the starting
entry's. Writes OUT/es.json (every candidate, score and per-task value), OUT/adam.json (the
baseline curves), OUT/theta.safetensors and, for a rule meta-train has a kind for (all but
progress and horizon inputs together, and a validation loss's), OUT/resume.safetensors (a compact resume checkpoint for
`meta-train --continue-from`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lopt_ext import checkpoint, pretrained  # noqa: E402
from lopt_ext.metatrain import evaluate as ev  # noqa: E402
from lopt_ext.__main__ import add_cpu_devices_option  # noqa: E402
from lopt_ext.metatrain.population import use_cpu_cores  # noqa: E402
from lopt_ext.scaled import (DECAY_OFF, LOSS_SOURCES, NUM_GAP_INPUTS, NUM_HORIZON_INPUTS, NUM_LOSS_INPUTS,  # noqa: E402
                             NUM_PROGRESS_INPUTS, ScaledSmallFcLOpt, with_horizon_inputs, with_loss_inputs, with_progress_inputs)
from lopt_ext.tasks import augment, family  # noqa: E402
from scale_search import pes_kind, validation_task, write_pes_resume  # noqa: E402

# meta-training MLP tasks of every data set, depth, activation and init scale (indices into
# family.TRAIN_SPECS, whose first 45 entries are family.TRAIN_MLP_SPECS)
TASKS = (0, 2, 3, 5, 6, 8, 10, 12, 13, 16, 18, 20, 22, 25, 26, 29, 30, 35, 37, 41)
CLIP = (-1.0, 3.0)  # default --clip (the score of a non-finite run is the upper end)


# What the search may move: "scale" = the per-tensor scale's linear coefficients and bias;
# "scale+decays" also the momentum and rms decay offsets, times 10 (a unit step multiplies
# 1 - beta by e; see SmallFcLOpt.decays); "scale+hidden" also the output weights w2 of the
# scale's hidden units (whose input weights keep their random init): a nonlinear scale;
# "progress" only the coefficients of the progress inputs in the scale, its bias, and the
# learned weight decay's coefficients and bias (needs --progress-inputs); "scale+progress" all
# of the scale's linear coefficients and bias and the decay's (needs --progress-inputs);
# "horizon" the coefficients of the horizon inputs (the last inputs) and the scale's bias (needs
# --horizon-inputs; the last but the loss inputs' with --loss-inputs); "loss" the coefficients of
# the loss inputs (the last inputs) and the bias (needs --loss-inputs); "horizon+loss" both;
# "gap", "loss+gap", "horizon+loss+gap" the same with the validation loss's gap inputs (the
# last with --loss-inputs train+validation, which the kinds without "gap" then cannot move).
COORDINATES = ("scale", "scale+decays", "scale+hidden", "progress", "scale+progress", "horizon", "loss",
               "horizon+loss", "gap", "loss+gap", "horizon+loss+gap")
NEEDS_PROGRESS = ("progress", "scale+progress")
DECAY_UNIT = 10.0
# kinds that move the last inputs of the scale (how many) and its bias
TAIL_INPUTS = {"horizon": NUM_HORIZON_INPUTS, "loss": NUM_LOSS_INPUTS,
               "horizon+loss": NUM_HORIZON_INPUTS + NUM_LOSS_INPUTS, "gap": NUM_GAP_INPUTS,
               "loss+gap": NUM_LOSS_INPUTS + NUM_GAP_INPUTS,
               "horizon+loss+gap": NUM_HORIZON_INPUTS + NUM_LOSS_INPUTS + NUM_GAP_INPUTS}


def usable_kind(kind, progress_inputs, horizon_inputs, loss_inputs):
    """None if ``kind`` fits a rule with these inputs, else why not."""
    if kind in NEEDS_PROGRESS and not progress_inputs:
        return f"{kind!r} needs --progress-inputs"
    if "horizon" in kind and not horizon_inputs:
        return f"{kind!r} needs --horizon-inputs"
    if "loss" in kind and not loss_inputs:
        return f"{kind!r} needs --loss-inputs"
    if kind == "progress" and (horizon_inputs or loss_inputs):
        return "'progress' moves the last inputs, which --horizon-inputs/--loss-inputs make theirs: use 'scale+progress'"
    if kind == "horizon" and loss_inputs:
        return "'horizon' moves the last inputs, which --loss-inputs makes the loss's: use 'horizon+loss'"
    gap = loss_inputs == "train+validation"
    if "gap" in kind and not gap:
        return f"{kind!r} needs --loss-inputs train+validation"
    if "loss" in kind and "gap" not in kind and gap:
        return f"{kind!r} moves the last inputs, which train+validation makes the gap's: use '{kind}+gap'"
    if "horizon" in kind and kind != "horizon+loss+gap" and gap:
        return "with train+validation loss inputs use 'horizon+loss+gap'"
    return None


def coordinates(theta, kind="scale"):
    ts = theta["tensor_scale"]
    if kind in TAIL_INPUTS:
        return np.concatenate([np.asarray(ts["w_lin"], np.float32)[-TAIL_INPUTS[kind]:], np.asarray(ts["b"], np.float32)])
    if kind == "progress":
        return np.concatenate([np.asarray(ts["w_lin"], np.float32)[-NUM_PROGRESS_INPUTS:],
                               np.asarray(ts["b"], np.float32), np.asarray(ts["decay_w"], np.float32),
                               np.asarray(ts["decay_b"], np.float32)])
    parts = [np.asarray(ts["w_lin"], np.float32), np.asarray(ts["b"], np.float32)]
    if kind == "scale+decays":
        parts += [DECAY_UNIT * np.asarray(theta[k], np.float32) for k in ("momentum_decays", "rms_decays")]
    if kind == "scale+hidden":
        parts.append(np.asarray(ts["w2"], np.float32))
    if kind == "scale+progress":
        parts += [np.asarray(ts["decay_w"], np.float32), np.asarray(ts["decay_b"], np.float32)]
    return np.concatenate(parts)


def with_coordinates(theta, x, kind="scale"):
    ts = dict(theta["tensor_scale"])
    if kind in TAIL_INPUTS:
        k = TAIL_INPUTS[kind]
        ts["w_lin"], ts["b"] = jnp.concatenate([jnp.asarray(ts["w_lin"])[:-k], x[:k]]), x[k:k + 1]
        return dict(theta, tensor_scale=ts)
    if kind == "progress":
        k = NUM_PROGRESS_INPUTS
        ts["w_lin"] = jnp.concatenate([jnp.asarray(ts["w_lin"])[:-k], x[:k]])
        ts["b"], ts["decay_w"], ts["decay_b"] = x[k:k + 1], x[k + 1:2 * k + 1], x[2 * k + 1:2 * k + 2]
        return dict(theta, tensor_scale=ts)
    n = ts["w_lin"].shape[0]
    ts["w_lin"], ts["b"] = x[:n], x[n:n + 1]
    out = dict(theta, tensor_scale=ts)
    if kind == "scale+decays":
        dm, dr = theta["momentum_decays"].shape[0], theta["rms_decays"].shape[0]
        out["momentum_decays"] = x[n + 1:n + 1 + dm] / DECAY_UNIT
        out["rms_decays"] = x[n + 1 + dm:n + 1 + dm + dr] / DECAY_UNIT
    if kind == "scale+hidden":
        ts["w2"] = x[n + 1:n + 1 + ts["w2"].shape[0]]
    if kind == "scale+progress":
        k = NUM_PROGRESS_INPUTS
        ts["decay_w"], ts["decay_b"] = x[n + 1:n + 1 + k], x[n + 1 + k:n + 2 + k]
    return out


def best_mean(info):
    """(score, coordinates) of the best ES mean recorded in an es.json."""
    first_best = min(info["history"], key=lambda h: h["scores"][0])  # the earliest on ties
    return first_best["scores"][0], np.asarray(first_best["candidates"][0], np.float32)


def adam_baselines(tasks, seeds, steps, cache):
    """Per task: the smoothed validation curve [S, n] of Adam tuned as the evaluation tunes it
    (evaluate.baseline_sweep, cached in the JSON file ``cache``)."""
    return {task.name: ev.smooth(np.asarray(ev.baseline_sweep(task, "adam", seeds, steps, cache=cache,
                                                              horizons=(steps,))["curve"]))
            for task in tasks}


def adam_candidates(tasks, seeds, steps, cache):
    """Per task: Adam's curves at every learning rate of the grid (evaluate._candidates), the
    reference that views.task_views tunes per view."""
    return {task.name: ev._candidates(task, "adam", seeds, steps, ev.EVERY, ev.DEFAULT_LRS, cache, (steps,))
            for task in tasks}


SEARCH_VIEWS = ("best_heldout", "final_heldout", "train_final")


def score_task_views(held, train, reference, steps, view_names, clip=CLIP):
    """held [C, S, n], train [C, S, m] candidates' validation and training-loss curves; reference:
    Adam's per-lr candidates. -> [C, S]: per task-seed the mean over ``view_names`` of the log
    ratio to Adam tuned on that view (views.py), each clipped (infinite: the upper end)."""
    from lopt_ext.metatrain import views
    contenders = {str(c): [(str(c), ev.smooth(held[c]), np.asarray(train[c], np.float64))] for c in range(len(held))}
    tv = views.task_views(contenders, reference, steps, ev.EVERY, ev.TRAIN_EVERY)["contenders"]
    out = np.zeros(held.shape[:2])
    for c in range(len(held)):
        for v in view_names:
            ratio = np.asarray(tv[str(c)][v], np.float64)
            value = np.log(np.where(np.isfinite(ratio) & (ratio > 0), ratio, np.exp(clip[1])))
            out[c] += np.clip(value, *clip) / len(view_names)
    return out


def score_task(held, base, clip=CLIP):
    """held [C, S, n] candidates' curves, base [S, n] tuned Adam's smoothed curve -> [C, S]."""
    final = ev.smooth(held)[:, :, -1]
    ratio = final / base[None, :, -1]
    value = np.log(np.where(np.isfinite(ratio) & (ratio > 0), ratio, np.exp(clip[1])))
    return np.clip(value, *clip)


def starting_rule(ap, source: str):
    """(lopt, theta, budget) of --from-pretrained: a shipped entry, or a ScaledSmallFcLOpt theta
    file, whose budget is that of the meta-train run that wrote it (provenance.json beside it;
    none recorded: zero)."""
    if source in pretrained.list_pretrained():
        return (*pretrained.load(source), pretrained.info(source)["budget"])
    if not source.endswith(".safetensors") or not os.path.isfile(source):
        ap.error(f"argument --from-pretrained: {source!r} is neither a shipped entry "
                 f"({', '.join(pretrained.list_pretrained())}) nor a theta .safetensors file")
    try:
        lopt, theta = checkpoint.load_theta(source)
    except (OSError, ValueError) as e:
        ap.error(f"argument --from-pretrained: cannot read {source}: {e}")
    if not isinstance(lopt, ScaledSmallFcLOpt):
        ap.error(f"argument --from-pretrained: {source} holds {type(lopt).__name__}, not ScaledSmallFcLOpt")
    budget = {"wall_s": 0.0, "cpu_hours": 0.0, "runs": []}
    prov_path = os.path.join(os.path.dirname(source), "provenance.json")
    if os.path.isfile(prov_path):
        with open(prov_path) as f:
            budget = json.load(f).get("budget", budget)
    return lopt, theta, budget


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--from-pretrained", default="scaled_small_fc_lopt_h4", metavar="NAME_OR_THETA",
                    help="the rule to start from: a shipped entry's name, or a theta .safetensors file (e.g. "
                         "a meta-train run's OUT/theta.safetensors, whose provenance.json beside it gives the "
                         "budget) (default: scaled_small_fc_lopt_h4)")
    ap.add_argument("--generations", type=int, default=12)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--sigma-decay", type=float, default=0.9)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--task-indices", type=int, nargs="+", default=list(TASKS),
                    help="indices into family.TRAIN_SPECS of the meta-training split (0-44: its MLPs, "
                         "45-52: a convnet, a char RNN, 3 quadratics, 3 logistic regressions; "
                         "default: 20 MLPs of every data set)")
    ap.add_argument("--time-budget", type=float, default=None, help="stop after this many seconds")
    ap.add_argument("--resume", action="store_true", help="continue the search in OUT (its es.json)")
    ap.add_argument("--start-from", metavar="ES_JSON", default=None,
                    help="start from the best mean of an earlier search (its budget is added to this one's)")
    ap.add_argument("--coordinates", choices=COORDINATES, default="scale")
    ap.add_argument("--progress-inputs", action="store_true",
                    help="give the scale the progress inputs of lopt_ext.scaled (weights starting at 0: "
                         "the starting rule unchanged) and search their coefficients too")
    ap.add_argument("--objective-views", nargs="+", choices=SEARCH_VIEWS, default=None, metavar="VIEW",
                    help=f"score each task-seed by the mean clipped log ratio of these views of the evaluation "
                         f"({', '.join(SEARCH_VIEWS)}), each against Adam tuned on it (default: the final "
                         "validation loss against Adam tuned on it)")
    ap.add_argument("--horizon-inputs", action="store_true",
                    help="give the scale the horizon inputs of lopt_ext.scaled (weights starting at 0: the "
                         "starting rule unchanged; runs are told their length, --steps)")
    ap.add_argument("--loss-inputs", choices=LOSS_SOURCES, default=None,
                    help="give the scale the loss inputs of lopt_ext.scaled (weights starting at 0: the starting "
                         "rule unchanged), fed each step's minibatch loss (train), a validation-batch loss, or "
                         "both (train+validation: also the generalisation-gap inputs)")
    ap.add_argument("--augment-reparam", type=float, default=0.0, metavar="LOG10_RANGE",
                    help="task augmentation: search on copies of the tasks whose parameter tensors are stored "
                         "divided by fixed factors 10**U(-R, R), one per tensor (lopt_ext.tasks.augment; "
                         "the copy of TRAIN_SPECS[i] draws them with seed i). Default 0: the tasks themselves")
    ap.add_argument("--clip", type=float, nargs=2, default=list(CLIP), metavar=("LOW", "HIGH"),
                    help="per task-seed log-ratio clip (the upper end also scores a non-finite run)")
    ap.add_argument("--decay-start", type=float, default=None, metavar="LAMBDA",
                    help="with --progress-inputs: start the learned weight decay at this lambda "
                         "(default: off, as the starting rule)")
    add_cpu_devices_option(ap)
    args = ap.parse_args(argv)
    if args.decay_start is not None and not 0 < args.decay_start <= 0.1:
        ap.error("argument --decay-start: must be in (0, 0.1]")
    use_cpu_cores(args.cpu_devices)
    for name in ("generations", "pairs", "steps"):
        if getattr(args, name) < 1:
            ap.error(f"argument --{name}: must be >= 1")
    if args.steps % ev.TRAIN_EVERY:
        ap.error(f"argument --steps: must be a multiple of {ev.TRAIN_EVERY}")
    if not args.sigma > 0:
        ap.error("argument --sigma: must be > 0")
    if not 0 <= args.augment_reparam <= 6:
        ap.error("argument --augment-reparam: must be in [0, 6]")
    os.makedirs(args.out, exist_ok=True)
    if not args.clip[0] < 0 < args.clip[1]:
        ap.error("argument --clip: needs LOW < 0 < HIGH")
    if args.resume and args.start_from:
        ap.error("argument --start-from: not with --resume (a resumed search keeps its start)")
    lopt, base_theta, start = starting_rule(ap, args.from_pretrained)
    # an entry that has the inputs already keeps them
    args.horizon_inputs = args.horizon_inputs or bool(getattr(lopt, "horizon_inputs", False))
    args.progress_inputs = args.progress_inputs or bool(getattr(lopt, "progress_inputs", False))
    args.loss_inputs = args.loss_inputs or getattr(lopt, "loss_inputs", None)
    why = usable_kind(args.coordinates, args.progress_inputs, args.horizon_inputs, args.loss_inputs)
    if why:
        ap.error(f"argument --coordinates: {why}")
    if args.progress_inputs:
        lopt, base_theta = with_progress_inputs(lopt, base_theta)
        if args.decay_start is not None and float(base_theta["tensor_scale"]["decay_b"][0]) <= DECAY_OFF:
            ts = dict(base_theta["tensor_scale"], decay_b=jnp.asarray([np.log(args.decay_start)], jnp.float32))
            base_theta = dict(base_theta, tensor_scale=ts)
    if args.horizon_inputs:
        lopt, base_theta = with_horizon_inputs(lopt, base_theta)
    if args.loss_inputs:
        lopt, base_theta = with_loss_inputs(lopt, base_theta, args.loss_inputs)
    earlier = []  # runs of earlier searches this one starts from
    if args.start_from:
        try:
            with open(args.start_from) as f:
                prev = json.load(f)
            _, x_prev = best_mean(prev)
        except (OSError, ValueError, KeyError) as e:
            ap.error(f"argument --start-from: cannot read {args.start_from}: {e}")
        if prev["from_pretrained"] != args.from_pretrained:
            ap.error(f"argument --start-from: {args.start_from} started from {prev['from_pretrained']!r}, "
                     f"not {args.from_pretrained!r}")
        kind = next((k for k in COORDINATES if prev.get("coordinates", k) == k
                     and not usable_kind(k, args.progress_inputs, args.horizon_inputs, args.loss_inputs)
                     and coordinates(base_theta, k).size == x_prev.size), None)
        if kind is None:
            ap.error(f"argument --start-from: its {prev.get('coordinates')!r} coordinates do not fit this rule")
        base_theta = with_coordinates(base_theta, jnp.asarray(x_prev), kind)
        earlier = prev.get("runs") or [{"command": prev["command"], "wall_s": prev["wall_s"]}]
    n_specs = len(family.TRAIN_SPECS)
    bad = [i for i in args.task_indices if not 0 <= i < n_specs]
    if bad:
        ap.error(f"argument --task-indices: {bad} out of range (0..{n_specs - 1})")
    tasks = [validation_task(family.make_task(family.TRAIN_SPECS[i])) for i in args.task_indices]
    if args.augment_reparam:
        tasks = [augment.reparameterized(t, i, args.augment_reparam) for t, i in zip(tasks, args.task_indices)]
    t0 = time.perf_counter()
    adam_cache = os.path.join(args.out, "adam.json")
    if args.objective_views:  # each view tunes Adam's learning rate on its own quantity
        by_lr = adam_candidates(tasks, args.seeds, args.steps, adam_cache)
    else:
        baselines = adam_baselines(tasks, args.seeds, args.steps, adam_cache)
    print(f"tuned Adam baselines: {time.perf_counter() - t0:.0f} s", flush=True)
    command = "python tools/scale_es.py " + " ".join(argv or sys.argv[1:])
    mean, sigma, first = coordinates(base_theta, args.coordinates), args.sigma, 0
    rng = np.random.default_rng(args.seed)
    history, runs = [], []
    es_path = os.path.join(args.out, "es.json")
    if args.resume:
        if not os.path.isfile(es_path):
            ap.error(f"argument --resume: {es_path} does not exist")
        with open(es_path) as f:
            prev = json.load(f)
        keys = ("from_pretrained", "seeds", "steps", "tasks", "pairs", "coordinates", "clip", "progress_inputs",
                "horizon_inputs")
        same = tuple(prev.get(k, False) for k in keys) + (prev.get("objective_views"), prev.get("loss_inputs"),
                                                          prev.get("augment_reparam", 0.0)) == (
            args.from_pretrained, args.seeds, args.steps, [t.name for t in tasks], args.pairs, args.coordinates,
            list(args.clip), args.progress_inputs, args.horizon_inputs, args.objective_views, args.loss_inputs,
            args.augment_reparam)
        if not same:
            ap.error(f"argument --resume: {es_path} was made with other --from-pretrained/--seeds/--steps/"
                     "--task-indices/--pairs/--coordinates/--clip/--progress-inputs/--horizon-inputs/--objective-views/"
                     "--loss-inputs/--augment-reparam")
        mean, sigma, first = np.asarray(prev["mean"], np.float32), prev["sigma"], prev["generation"] + 1
        rng.bit_generator.state = prev["rng_state"]
        history, runs = prev["history"], prev["runs"]
        earlier, base_theta = prev["earlier_runs"], checkpoint.load_theta(os.path.join(args.out, "start.safetensors"))[1]
    else:  # the rule the perturbations are applied to, for --resume
        checkpoint.save_theta(os.path.join(args.out, "start.safetensors"), base_theta, lopt)
    horizon = args.steps if lopt.uses_horizon else None
    make_tx = lambda x: lopt.transform(with_coordinates(base_theta, x, args.coordinates), num_steps=horizon)
    dim = mean.size
    loss_values = ev.loss_values(lopt)  # a loss-reading rule gets the loss it reads
    runs = runs + [{"command": command, "wall_s": 0.0}]
    from tqdm import tqdm
    bar = tqdm(range(first, args.generations), desc="scale_es", dynamic_ncols=True)
    for gen in bar:
        eps = rng.standard_normal((args.pairs, dim)).astype(np.float32)
        cands = np.concatenate([mean[None], mean + sigma * eps, mean - sigma * eps])
        values = np.zeros((len(cands),))
        per_task = {}
        for task in tasks:
            held, train = ev.run_curves(task, make_tx, cands, args.seeds, args.steps, **loss_values)
            if args.objective_views:
                v = score_task_views(held, train, by_lr[task.name], args.steps, args.objective_views, tuple(args.clip))
            else:
                v = score_task(held, baselines[task.name], tuple(args.clip))
            per_task[task.name] = v.mean(1).tolist()
            values += v.mean(1) / len(tasks)
        # rank-weighted recombination of the perturbations that beat the mean (at most half of
        # them); when none does, the mean stays and sigma shrinks faster: moving towards the
        # least bad of a set of worse points is how a plain ES drifts off a good rule
        pert = np.concatenate([eps, -eps])
        order = [int(i) for i in np.argsort(values[1:]) if values[1 + i] < values[0]][: len(pert) // 2]
        if order:
            mu = len(order)
            w = np.log(mu + 0.5) - np.log(np.arange(1, mu + 1))
            w /= w.sum()
            mean = (mean + sigma * (w[:, None] * pert[order]).sum(0)).astype(np.float32)
        else:
            sigma *= args.sigma_decay
        history.append({"generation": gen, "sigma": sigma, "mean_score": float(values[0]),
                        "best_score": float(values.min()), "candidates": cands.tolist(),
                        "scores": values.tolist(), "per_task": per_task,
                        "wall_s": time.perf_counter() - t0})
        sigma *= args.sigma_decay
        best_score, best = best_mean({"history": history})  # the best mean, not the luckiest perturbation
        bar.set_postfix(mean=f"{values[0]:.3f}", best_mean=f"{best_score:.3f}")
        tqdm.write(f"generation {gen}: mean {values[0]:.4f}, best perturbation {values.min():.4f}, "
                   f"best mean so far {best_score:.4f} ({time.perf_counter() - t0:.0f} s)")
        theta = with_coordinates(base_theta, jnp.asarray(best), args.coordinates)
        runs[-1]["wall_s"] = time.perf_counter() - t0
        wall = sum(r["wall_s"] for r in earlier + runs)
        # the budget adds up: the starting entry's, then every run of this search
        budget = {"wall_s": start["wall_s"] + wall, "cpu_count": os.cpu_count(), "outer_steps": 0,
                  "cpu_hours": start["cpu_hours"] + wall * (os.cpu_count() or 1) / 3600,
                  "runs": start.get("runs", []) + [dict(r, outer_steps_end=0) for r in earlier + runs]}
        info = {"command": command, "from_pretrained": args.from_pretrained, "tasks": [t.name for t in tasks],
                "seeds": args.seeds, "steps": args.steps, "pairs": args.pairs, "coordinates": args.coordinates,
                "progress_inputs": args.progress_inputs, "horizon_inputs": args.horizon_inputs,
                "loss_inputs": args.loss_inputs, "augment_reparam": args.augment_reparam, "clip": list(args.clip),
                "objective_views": args.objective_views,
                "objective": (f"mean over task-seeds of the mean over {args.objective_views} of log(ratio to Adam tuned "
                              "on that view)" if args.objective_views else "mean log(final validation loss / tuned "
                              "Adam's)") + f", clipped to {list(args.clip)}", "start_from": args.start_from, "earlier_runs": earlier,
                "best": best.tolist(), "best_score": best_score, "generation": gen, "mean": mean.tolist(),
                "sigma": sigma, "rng_state": rng.bit_generator.state, "runs": runs,
                "budget": budget, "wall_s": wall, "cpu_count": os.cpu_count(), "history": history}
        checkpoint.save_theta(os.path.join(args.out, "theta.safetensors"), theta, lopt,
                              info={"es_best_score": best_score})
        if pes_kind(lopt) is not None:  # a rule that meta-train has a kind for
            info["config"] = write_pes_resume(os.path.join(args.out, "resume.safetensors"), lopt, theta, budget,
                                              command, args.seed).to_json()
        checkpoint.atomic_write_bytes(es_path, json.dumps(info).encode())
        if args.time_budget is not None and time.perf_counter() - t0 > args.time_budget:
            tqdm.write("time budget reached")
            break
    print(f"best score {best_score:.4f}; wrote {args.out}/theta.safetensors, es.json")


if __name__ == "__main__":
    main()

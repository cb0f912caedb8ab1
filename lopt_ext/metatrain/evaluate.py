"""Evaluation that judges a learned optimizer as a user would: held-out loss against tuned Adam.

Protocol (``evaluate``), per task and seed (seed s: params init key PRNGKey(s), batch stream
fold_in(PRNGKey(s), 1), the same for every optimizer):
- every optimizer trains for ``max(horizons)`` steps; the held-out (test) loss is recorded every
  ``every`` steps and smoothed by a ``SMOOTH``-step trailing mean; the training loss (full
  training set) is recorded every ``TRAIN_EVERY`` steps and reported beside it;
- baselines: Adam with a constant learning rate and Adam with a linear warmup (5% of the
  horizon) and a cosine decay to 0 at the horizon, each tuned per task and per horizon over the
  ``lrs`` grid (default 7 values, 1e-4 .. 1e-1 in half decades) on the mean over seeds of the
  final smoothed held-out loss;
- metrics at horizon T, per task-seed, against the tuned baseline's final smoothed held-out loss
  L_adam of the same seed:
    steps ratio = (first step from which the learned optimizer's smoothed held-out loss stays
                   <= L_adam up to T) / T; None (counted as infinite) if it is not below at T;
    final ratio = learned final smoothed held-out loss / L_adam;
    diverged    = a non-finite loss, or a final smoothed held-out loss above the initial one;
- summary: medians over all task-seeds, the number of tasks whose mean final ratio exceeds
  1.5, divergences.
The baselines do not depend on theta, so they are cached (``adam_cache`` JSON).

``evaluate_views`` adds the field's views (views.py: best and final held-out, training loss,
training speedup, time-to-target) against Adam tuned over both schedules on each view's own
criterion and against untuned Adam (lr UNTUNED_LR), with IQM and bootstrap intervals, for the
evaluated optimizer and any compared ones.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from lopt_ext.metatrain.report import format_summary, format_table  # noqa: F401  (re-exported)
from lopt_ext.metatrain import compiled
from lopt_ext.metatrain.population import population_vmap

DEFAULT_LRS = tuple(float(x) for x in np.logspace(-4, -1, 7))  # 1e-4 .. 1e-1, half decades
HORIZONS = (1000, 3000)
EVERY = 5          # held-out loss recorded every EVERY steps
SMOOTH = 20        # trailing mean over this many steps
TRAIN_EVERY = 100  # training loss (full training set) recorded every TRAIN_EVERY steps
FAIL_RATIO = 1.5   # a task "fails" when its mean final held-out loss exceeds 1.5x the baseline's
BASELINES = ("adam", "adam_warmup_cosine")  # the two schedules a user tunes
WARMUP_FRACTION = 0.05  # adam_warmup_cosine: linear warmup over this fraction of the horizon
CURVE_DIGITS = 4  # significant digits of the per-learning-rate curves kept in the cache
UNTUNED_LR = 1e-3  # what a user who does not tune runs Adam with
# Adam as a user keeps it: ONE run per task (schedule and learning rate) chosen on one criterion,
# then judged on every view, unlike the "(tuned)" rows, which are tuned anew for each view
ONE_RUN_ADAM = {"best_heldout": "adam, one run (tuned on best held-out)",
                "train_final": "adam, one run (tuned on training loss)"}


def _init_run(task, seed):
    key = jax.random.PRNGKey(seed)
    return task.init(key), jax.random.fold_in(key, 1)


def adam_tx(lr):
    return optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(lr))


def sgd_tx(lr):
    return optax.sgd(lr)


def sgd_momentum_tx(lr):
    return optax.sgd(lr, momentum=0.9)


def adafactor_tx(lr):
    return optax.adafactor(learning_rate=lr)


# Constant-learning-rate optimizers that baseline_sweep tunes over the grid (module-level
# functions: the jitted curve function is cached on them).
CONSTANT_LR = {"adam": adam_tx, "sgd": sgd_tx, "sgd_momentum": sgd_momentum_tx, "adafactor": adafactor_tx}


@functools.lru_cache(maxsize=None)
def cosine_adam_tx(horizon: int):
    """lr -> Adam whose learning rate decays from lr to 0 over ``horizon`` steps (cosine)."""
    def make(lr):
        return optax.chain(optax.scale_by_adam(),
                           optax.scale_by_learning_rate(optax.cosine_decay_schedule(lr, horizon)))
    return make


@functools.lru_cache(maxsize=None)
def warmup_cosine_adam_tx(horizon: int):
    """lr -> Adam whose learning rate rises linearly from 0 to lr over the first
    WARMUP_FRACTION of ``horizon`` steps, then decays to 0 at ``horizon`` (cosine)."""
    warmup = max(1, int(round(WARMUP_FRACTION * horizon)))
    # unit peak, scaled by lr afterwards: lr is traced (one vmapped run per grid point)
    unit = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, horizon, end_value=0.0)

    def make(lr):
        return optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(lambda count: lr * unit(count)))
    return make


# Scheduled baselines: horizon -> (lr -> optax transformation), one sweep per horizon.
SCHEDULED = {"adam_cosine": cosine_adam_tx, "adam_warmup_cosine": warmup_cosine_adam_tx}
SWEEPS = tuple(CONSTANT_LR) + tuple(SCHEDULED)


def lopt_tx_factory(lopt, theta, impl="fused", num_steps=None):
    return lambda _hp: lopt.transform(theta, impl=impl, num_steps=num_steps)


# Bounded: each compiled run holds hundreds of memory mappings until dropped (compiled.py), and
# an unbounded cache crashed `evaluate --compare` after ~100 of them. As many as fit under the
# OS's limit (44 at Linux's default): a search that runs its ~20 tasks every generation
# (tools/scale_es.py) must not recompile them all each time, as a cache of 16 made it do.
COMPILED_CURVES = compiled.tasks_that_fit()


@functools.lru_cache(maxsize=COMPILED_CURVES)
def _curve_fn(task, make_tx, steps: int, every: int, train_every: int, validation_value: bool = False,
              train_value: bool = False):
    """jit(vmap over members, spread over the devices) of a training run recording the held-out loss every ``every``
    steps and the training loss every ``train_every`` steps. make_tx(hp) -> optax
    transformation; hp is the member's (traced) hyper-parameter. validation_value: pass each
    step's loss on a validation batch (never trained on, not the test data) to the
    transformation as ``value`` (optax's extra argument, e.g. for reduce_on_plateau);
    train_value: pass the step's minibatch loss instead (what loss-reading rules such as
    Celo are meta-trained with); both: the minibatch loss as ``value`` and the validation
    batch's as ``validation_value`` (ScaledSmallFcLOpt(loss_inputs="train+validation"))."""
    n_chunks = steps // every
    ratio = train_every // every

    def run(hp, seed_key, params):
        tx = make_tx(hp)
        state = tx.init(params)

        def step(carry, i):
            params, state = carry
            batch = task.sample_batch(jax.random.fold_in(seed_key, i))
            if train_value:
                value, grads = jax.value_and_grad(task.loss)(params, batch)
            else:
                grads = jax.grad(task.loss)(params, batch)
            losses = {"value": value} if train_value else {}
            if validation_value:
                valid = task.loss(params, task.valid_batch(jax.random.fold_in(seed_key, i)))
                losses["validation_value" if train_value else "value"] = valid
            if losses:
                updates, state = tx.update(grads, state, params, **losses)
            else:
                updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        def chunk(carry, c):
            carry, _ = lax.scan(step, carry, c * every + jnp.arange(every))
            held_out = task.eval_loss(carry[0])
            train = lax.cond((c + 1) % ratio == 0, task.train_loss, lambda p: jnp.float32(jnp.nan), carry[0])
            return carry, (held_out, train)

        (params, _), (held_out, train) = lax.scan(chunk, (params, state), jnp.arange(n_chunks))
        return held_out, train

    return jax.jit(population_vmap(run, in_axes=(0, 0, 0)))


def loss_values(lopt) -> Dict[str, bool]:
    """run_curves' train_value / validation_value for ``lopt``: a rule that reads the loss is fed
    the one it was meta-trained on (``lopt.loss_source``), the others none."""
    return {"train_value": lopt.uses_loss and lopt.loss_source == "train",
            "validation_value": lopt.uses_loss and (lopt.loss_source == "validation" or lopt.uses_validation_loss)}


def run_curves(task, make_tx, hps, seeds, steps=1000, every=EVERY, train_every=TRAIN_EVERY,
               validation_value=False, train_value=False):
    """Held-out curves [len(hps), len(seeds), steps//every + 1] and training-loss curves
    [len(hps), len(seeds), steps//train_every + 1]; index 0 is the initial loss.
    validation_value, train_value: see _curve_fn."""
    if steps % every or train_every % every or steps % train_every:
        raise ValueError(f"steps ({steps}) must be a multiple of train_every ({train_every}), "
                         f"itself a multiple of every ({every})")
    hps = jnp.asarray(hps, jnp.float32)
    H, S = hps.shape[0], len(seeds)
    inits = [_init_run(task, s) for s in seeds]
    params = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *[p for p, _ in inits])
    keys = jnp.stack([k for _, k in inits])
    init_eval = np.asarray(jax.vmap(task.eval_loss)(params))
    init_train = np.asarray(jax.vmap(task.train_loss)(params))
    rep = lambda x: jnp.broadcast_to(x[None], (H,) + x.shape).reshape((H * S,) + x.shape[1:])
    fn = _curve_fn(task, make_tx, steps, every, train_every, bool(validation_value), bool(train_value))
    held_out, train = fn(jnp.repeat(hps, S, axis=0), rep(keys), jax.tree_util.tree_map(rep, params))
    held_out = np.asarray(held_out, np.float64).reshape(H, S, -1)
    train = np.asarray(train, np.float64).reshape(H, S, -1)[:, :, train_every // every - 1::train_every // every]
    held_out = np.concatenate([np.broadcast_to(init_eval[None, :, None], (H, S, 1)), held_out], axis=2)
    train = np.concatenate([np.broadcast_to(init_train[None, :, None], (H, S, 1)), train], axis=2)
    return held_out, train


def smooth(curve, every=EVERY, window=SMOOTH):
    """Trailing mean over the last ``window`` steps (window // every recorded points); the
    initial point (index 0) is kept as is. Non-finite values stay non-finite."""
    curve = np.asarray(curve, np.float64)
    k = max(1, window // every)
    out = curve.copy()
    for i in range(1, curve.shape[-1]):
        lo = max(1, i - k + 1)
        out[..., i] = curve[..., lo:i + 1].mean(axis=-1)
    return out


def steps_to_stay(curve, target, every, horizon):
    """First step from which ``curve`` (recorded every ``every`` steps) stays <= target up to
    ``horizon``; None when it is above the target at the horizon."""
    c = np.asarray(curve)[: horizon // every + 1]
    above = np.nonzero(~(c <= target))[0]
    if above.size == 0:
        return 0
    last = int(above[-1]) + 1
    return None if last >= len(c) else last * every


def _finite_or_none(x):
    x = float(x)
    return x if math.isfinite(x) else None


def _cache_key(name, task, seeds, horizon, every, lrs):
    return json.dumps([name, task.name, list(seeds), horizon, every, SMOOTH, [float(x) for x in lrs]])


def read_cache(cache: Optional[str]) -> Dict[str, Any]:
    """The tuned-baseline cache file's entries ({} without a file)."""
    if not cache or not os.path.exists(cache):
        return {}
    with open(cache) as f:
        return json.load(f)


def _rounded_curves(x):
    return np.vectorize(lambda v: float(f"{v:.{CURVE_DIGITS}g}"), otypes=[float])(x).tolist()


def _usable(entry, need_by_lr: bool) -> bool:
    return entry is not None and (not need_by_lr or "by_lr" in entry)


def baseline_sweep(task, name, seeds, horizon, every=EVERY, lrs=DEFAULT_LRS, cache: Optional[str] = None,
                   horizons=HORIZONS, need_by_lr: bool = False):
    """A baseline tuned for ``horizon`` over the learning-rate grid, on the mean over seeds of
    the final smoothed held-out loss. name "adam" (or another of CONSTANT_LR): constant learning
    rate (one run of the longest horizon serves every horizon, each tuned on its prefix);
    "adam_cosine" / "adam_warmup_cosine": (warmup and) cosine decay to 0 over ``horizon``.
    Independent of theta, so it can be cached in a JSON file. Every entry also keeps each
    learning rate's curves ("by_lr": held-out [lrs, seeds, points], train [lrs, seeds, points],
    CURVE_DIGITS significant digits), from which views tuned on other criteria pick their own
    learning rate (views.py); ``need_by_lr`` re-runs an older cached entry that lacks them."""
    if name not in SWEEPS:
        raise ValueError(f"baseline must be one of {SWEEPS}, got {name!r}")
    store = read_cache(cache)
    key = _cache_key(name, task, seeds, horizon, every, lrs)
    if _usable(store.get(key), need_by_lr):
        return store[key]
    t0 = time.perf_counter()
    if name in CONSTANT_LR:
        horizons = tuple(horizons) + (horizon,)
        steps = max(horizons)
        served = sorted({h for h in horizons if h % TRAIN_EVERY == 0} | {horizon})
        held_out, train = run_curves(task, CONSTANT_LR[name], lrs, seeds, steps, every)
    else:
        served = [horizon]
        held_out, train = run_curves(task, SCHEDULED[name](horizon), lrs, seeds, horizon, every)
    elapsed = time.perf_counter() - t0
    for h in served:
        ho, tr = held_out[:, :, : h // every + 1], train[:, :, : h // TRAIN_EVERY + 1]
        final = smooth(ho, every)[:, :, -1]
        finals = np.where(np.isfinite(final), final, np.inf).mean(1)
        best = int(np.argmin(finals))
        store[_cache_key(name, task, seeds, h, every, lrs)] = {
            "name": name, "horizon": h, "lrs": [float(x) for x in lrs], "best_lr": float(lrs[best]),
            "final_by_lr": [_finite_or_none(x) for x in finals],
            "curve": ho[best].tolist(), "train_curve": tr[best].tolist(), "time_s": elapsed,
            "by_lr": {"heldout": _rounded_curves(ho), "train": _rounded_curves(tr)}}
    if cache:
        from lopt_ext.checkpoint import atomic_write_bytes
        store = dict(read_cache(cache), **store)  # merge with entries written meanwhile
        atomic_write_bytes(cache, json.dumps(store).encode())
    return store[key]


def compare(lopt_curve, base_curve, horizon, every=EVERY):
    """Per-seed metrics of a learned optimizer's held-out curves [S, n] against a baseline's."""
    lo, ba = smooth(lopt_curve, every), smooth(base_curve, every)
    n = horizon // every
    out = []
    for s in range(lo.shape[0]):
        target = ba[s, n]
        final = lo[s, n]
        diverged = bool(not np.all(np.isfinite(lo[s, :n + 1])) or not final <= lo[s, 0])
        reach = steps_to_stay(lo[s], target, every, horizon)
        out.append({"baseline_final": _finite_or_none(target), "lopt_final": _finite_or_none(final),
                    "steps_to_stay": reach, "steps_ratio": None if reach is None else reach / horizon,
                    "final_ratio": _finite_or_none(final / target) if np.isfinite(final) and target > 0 else None,
                    "diverged": diverged})
    return out


def mean_final_ratio(per_seed) -> Optional[float]:
    """Mean over seeds of the learned optimizer's final loss over the baseline's mean (None when
    a seed has no finite final loss): what "tasks > 1.5x" is judged on."""
    finals_l = [p["lopt_final"] for p in per_seed]
    finals_b = [p["baseline_final"] for p in per_seed]
    if None in finals_l or None in finals_b:
        return None
    return float(np.mean(finals_l)) / float(np.mean(finals_b))


def evaluate_task(task, lopt, theta, seeds=(0, 1, 2), horizons=HORIZONS, every=EVERY, lrs=DEFAULT_LRS,
                  impl="fused", adam_cache: Optional[str] = None, make_tx=None,
                  validation_value: bool = False) -> Dict[str, Any]:
    """make_tx: hp -> the optax transformation judged (default: the learned optimizer's);
    validation_value: see _curve_fn. A rule that reads the horizon is told the run's length
    (the longest horizon) and one that reads the loss gets the one it was meta-trained on
    (``lopt.loss_source``: each step's minibatch loss, or a validation batch's)."""
    steps = max(horizons)
    t0 = time.perf_counter()
    values = {"validation_value": validation_value, "train_value": False}
    if make_tx is None and not validation_value:
        values = loss_values(lopt)
    make_tx = make_tx or lopt_tx_factory(lopt, theta, impl, num_steps=steps if lopt.uses_horizon else None)
    l_held, l_train = run_curves(task, make_tx, [0.0], list(seeds), steps, every, **values)
    res = {"task": task.name, "seeds": list(seeds), "every": every, "smooth": SMOOTH, "horizons": list(horizons),
           "lopt_time_s": time.perf_counter() - t0, "lopt_curve": l_held[0].tolist(),
           "lopt_train_curve": l_train[0].tolist(), "by_horizon": {}}
    for T in horizons:
        entry = {"lopt_final_train": _finite_or_none(np.nanmean(l_train[0, :, T // TRAIN_EVERY]))}
        for name in BASELINES:
            base = baseline_sweep(task, name, seeds, T, every, lrs, adam_cache, horizons, need_by_lr=True)
            per_seed = compare(l_held[0], np.asarray(base["curve"]), T, every)
            entry[name] = {"best_lr": base["best_lr"], "per_seed": per_seed,
                           "mean_final_ratio": mean_final_ratio(per_seed),
                           "baseline_final_train": _finite_or_none(np.nanmean(np.asarray(base["train_curve"])[:, -1])),
                           "baseline_curve": base["curve"]}
        res["by_horizon"][str(T)] = entry
    return res


def summarize(results, horizons=HORIZONS, baselines=BASELINES) -> Dict[str, Any]:
    """Medians over task-seeds, failing tasks and divergences, per horizon and baseline."""
    out = {}
    for T in horizons:
        for name in baselines:
            ratios, finals, diverged, fails, n = [], [], 0, [], 0
            for r in results:
                e = r["by_horizon"][str(T)][name]
                for p in e["per_seed"]:
                    n += 1
                    ratios.append(np.inf if p["steps_ratio"] is None else p["steps_ratio"])
                    finals.append(np.inf if p["final_ratio"] is None else p["final_ratio"])
                    diverged += int(p["diverged"])
                if e["mean_final_ratio"] is None or e["mean_final_ratio"] > FAIL_RATIO:
                    fails.append(r["task"])
            med = float(np.median(ratios)) if ratios else None
            out[f"{name}@{T}"] = {
                "task_seeds": n, "tasks": len(results),
                "median_steps_ratio": med if med is not None and math.isfinite(med) else None,
                "median_final_ratio": _finite_or_none(np.median(finals)) if finals else None,
                "reached_and_stayed": int(sum(np.isfinite(ratios))),
                "tasks_worse_than_1.5x": fails, "diverged_task_seeds": diverged}
    return out


def reference_summary(results, horizons=HORIZONS) -> Dict[str, Any]:
    """What a per-task tuned annealed Adam achieves on this metric: Adam with warmup and a cosine decay,
    its learning rate picked per task on the same held-out loss it is judged on, scored against
    tuned constant-lr Adam exactly as a learned optimizer is (from the baseline curves already in
    ``results``; no extra runs). It calibrates the goal: an oracle-tuned schedule, not a floor."""
    as_lopt = []
    for r in results:
        by = {}
        for T in horizons:
            e = r["by_horizon"][str(T)]
            per_seed = compare(np.asarray(e[BASELINES[1]]["baseline_curve"], np.float64),
                               np.asarray(e["adam"]["baseline_curve"], np.float64), T, r["every"])
            by[str(T)] = {"adam": {"per_seed": per_seed, "mean_final_ratio": mean_final_ratio(per_seed)}}
        as_lopt.append({"task": r["task"], "by_horizon": by})
    return {f"tuned {BASELINES[1]} vs adam@{T}": s for T in horizons
            for s in [summarize(as_lopt, (T,), baselines=("adam",))[f"adam@{T}"]]}


def task_cost(task) -> int:
    """Relative cost of one training step of ``task``: parameters x batch size (the batch size
    read from the task's name, ``_b64_``; 1 where it has none)."""
    m = re.search(r"_b(\d+)(_|$)", task.name)
    return task.num_params() * (int(m.group(1)) if m else 1)


def work_units(task, seeds, horizons, every=EVERY, lrs=DEFAULT_LRS, store: Optional[Dict[str, Any]] = None,
               adam_only: bool = False) -> int:
    """Training steps x task_cost that evaluating ``task`` will run: the learned optimizer's runs
    and the tuned-Adam sweeps not already in ``store`` (read_cache's entries; for the runtime
    estimate)."""
    store = store or {}
    missing = lambda name, h: not _usable(store.get(_cache_key(name, task, seeds, h, every, lrs)), True)  # noqa: E731
    steps = 0 if adam_only else len(seeds) * max(horizons)
    for name in BASELINES:
        if name in CONSTANT_LR:  # one run of the longest horizon serves them all
            steps += len(lrs) * len(seeds) * max(horizons) if any(missing(name, h) for h in horizons) else 0
        else:
            steps += sum(len(lrs) * len(seeds) * h for h in horizons if missing(name, h))
    return steps * task_cost(task)


def evaluate(task_names: Sequence[str], lopt, theta, seeds=(0, 1, 2), horizons=HORIZONS, every=EVERY,
             lrs=DEFAULT_LRS, impl="fused", progress=True, adam_cache: Optional[str] = None,
             adam_only: bool = False, make_tx=None, validation_value: bool = False) -> List[Dict[str, Any]]:
    """Per task, the learned optimizer's runs against the tuned baselines. With ``progress``, a
    bar and, once the first task is done, an estimate of the time left (from its wall time and
    the remaining tasks' work_units)."""
    from lopt_ext.tasks import family
    results = []
    it = task_names
    units = None
    if progress:
        from tqdm import tqdm
        it = tqdm(task_names, desc="evaluate", dynamic_ncols=True)
        store = read_cache(adam_cache)  # read once for all tasks (the cache can be megabytes)
        units = [work_units(family.get_task(n), seeds, horizons, every, lrs, store, adam_only)
                 for n in task_names]
    t_start = time.perf_counter()
    for k, name in enumerate(it):
        if units is not None and k == 1 and units[0] > 0:
            per_unit = (time.perf_counter() - t_start) / units[0]
            it.write(f"evaluate: the first task took {time.perf_counter() - t_start:.0f} s; about "
                     f"{per_unit * sum(units[1:]) / 60:.1f} min left (estimated from the tasks' sizes)")
        task = family.get_task(name)
        if adam_only:
            for T in horizons:
                for b in BASELINES:
                    baseline_sweep(task, b, seeds, T, every, lrs, adam_cache, horizons, need_by_lr=True)
            continue
        res = evaluate_task(task, lopt, theta, seeds, horizons, every, lrs, impl, adam_cache, make_tx,
                            validation_value)
        res["split"] = next(s for s in family.SPLITS if name in family.list_tasks(s))
        results.append(res)
    return results


def plot_curves(results, path, horizon=None, title="learned optimizer vs tuned Adam (held-out loss)"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(results)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    # few tasks get larger panels and fonts, so that one or two panels stay readable
    width = {1: 7.0, 2: 5.5, 3: 5.0}.get(cols, 4.0)
    fs = {1: 9, 2: 9, 3: 8}.get(cols, 7)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 0.72 * width * rows + 0.6), squeeze=False)
    for ax, r in zip(axes.ravel(), results):
        T = horizon or max(r["horizons"])
        e = r["by_horizon"][str(T)]
        every = r["every"]
        series = [("lopt", np.asarray(r["lopt_curve"]), "learned", "C3"),
                  ("adam", np.asarray(e["adam"]["baseline_curve"]), f"Adam lr={e['adam']['best_lr']:.2g}", "C0"),
                  ("scheduled", np.asarray(e[BASELINES[1]]["baseline_curve"]),
                   f"Adam warmup-cosine lr={e[BASELINES[1]]['best_lr']:.2g}", "C2")]
        for _, c, label, color in series:
            c = smooth(c[:, : T // every + 1], every)
            x = np.arange(c.shape[1]) * every
            ax.plot(x, np.nanmean(c, 0), color=color, label=label, lw=1)
            ax.fill_between(x, np.nanmin(c, 0), np.nanmax(c, 0), color=color, alpha=0.15)
        ax.set_yscale("log")
        ax.set_title(f"{r['task']} ({r.get('split', '')})", fontsize=fs)
        ax.set_xlabel("step", fontsize=fs)
        ax.set_ylabel("held-out loss", fontsize=fs)
        ax.tick_params(labelsize=fs - 1)
        ax.legend(fontsize=fs - 1)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.suptitle(f"{title}: mean over seeds, band min-max", fontsize=fs + 2)
    fig.tight_layout()
    fig.savefig(path, dpi=90 if cols <= 3 else 70)
    plt.close(fig)


def _candidates(task, name, seeds, horizon, every, lrs, cache, horizons) -> List[Any]:
    """Baseline ``name``'s curves per learning rate as views.Candidate's (smoothed held-out)."""
    e = baseline_sweep(task, name, seeds, horizon, every, lrs, cache, horizons, need_by_lr=True)
    held = smooth(np.asarray(e["by_lr"]["heldout"], np.float64), every)
    train = np.asarray(e["by_lr"]["train"], np.float64)
    return [(f"{name} lr={lr:.2g}", held[i], train[i]) for i, lr in enumerate(e["lrs"])]


def evaluate_views(runs: Dict[str, List[Dict[str, Any]]], horizons=HORIZONS, lrs=DEFAULT_LRS,
                   adam_cache: Optional[str] = None, primary: Optional[str] = None) -> Dict[str, Any]:
    """The field's views (views.py) of every run in ``runs`` (contender name -> evaluate()'s
    results, the same tasks and seeds) and of Adam itself, per horizon: against Adam tuned per
    view over both schedules and the grid ("vs_tuned_adam"; contenders also Adam at UNTUNED_LR,
    each schedule tuned on its own, and Adam's one run per task of ONE_RUN_ADAM) and against
    Adam at UNTUNED_LR ("vs_adam_1e-3"), per task-seed and summarized over all tasks and per data
    regime; with the shipping bar for ``primary`` (and for Adam's one runs) at the longest
    horizon. Baselines come from (or are added to) ``adam_cache``."""
    from lopt_ext.metatrain import views
    from lopt_ext.tasks import family
    first = next(iter(runs.values()))
    names = [r["task"] for r in first]
    groups = {n: family.data_regime(n) for n in names}
    out = {"untuned_lr": UNTUNED_LR, "groups": groups, "by_horizon": {}}
    for T in horizons:
        tuned, fixed = [], []
        for i, name in enumerate(names):
            task = family.get_task(name)
            r0 = first[i]
            seeds, every = r0["seeds"], r0["every"]
            sched = {b: _candidates(task, b, seeds, T, every, lrs, adam_cache, horizons) for b in BASELINES}
            untuned = [c for c, lr in zip(sched["adam"], lrs) if np.isclose(lr, UNTUNED_LR)]
            if not untuned:
                raise ValueError(f"the learning-rate grid {lrs} lacks the untuned {UNTUNED_LR}")
            learned = {}
            for c, res in runs.items():
                if res[i]["task"] != name or res[i]["seeds"] != seeds:
                    raise ValueError(f"run {c!r} is not on the same tasks and seeds")
                learned[c] = [(c, smooth(np.asarray(res[i]["lopt_curve"], np.float64), every),
                               np.asarray(res[i]["lopt_train_curve"], np.float64))]
            both = [c for b in BASELINES for c in sched[b]]
            one_run = {label: [views.pick(both, v, T // every, T // TRAIN_EVERY)]
                       for v, label in ONE_RUN_ADAM.items()}
            contenders = dict(learned, **{"adam_1e-3": untuned}, **{f"{b} (tuned)": sched[b] for b in BASELINES},
                              **one_run)
            tuned.append({"task": name, **views.task_views(contenders, both, T, every, TRAIN_EVERY)})
            fixed.append({"task": name, **views.task_views(dict(learned, **{"adam (tuned, both schedules)": both}),
                                                           untuned, T, every, TRAIN_EVERY)})
        entry = {"vs_tuned_adam": {"per_task": tuned, "summary": views.summarize_views(tuned, groups)},
                 "vs_adam_1e-3": {"per_task": fixed, "summary": views.summarize_views(fixed, groups)}}
        out["by_horizon"][str(T)] = entry
    T = max(horizons)
    if primary is not None:
        e = out["by_horizon"][str(T)]["vs_tuned_adam"]
        out["ship_check"] = {"horizon": T, "optimizer": primary,
                             "checks": views.ship_check(e["per_task"], e["summary"]["all"], primary),
                             # the same bar for Adam's one run: what a single Adam run can meet
                             "adam_one_run": {label: views.ship_check(e["per_task"], e["summary"]["all"], label,
                                                                      peer=None) for label in ONE_RUN_ADAM.values()}}
    return out


def plot_views(views_doc, path, horizon=None):
    """One panel per view: each contender's median (dot) with its 95% bootstrap interval and IQM
    (cross), against Adam tuned per task, for all tasks and each data regime; log scale, 1 =
    tuned Adam."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from lopt_ext.metatrain.report import VIEW_TITLES
    horizon = str(horizon or max(int(h) for h in views_doc["by_horizon"]))
    summary = views_doc["by_horizon"][horizon]["vs_tuned_adam"]["summary"]
    groups = list(summary)
    names = list(summary["all"])
    fig, axes = plt.subplots(1, len(VIEW_TITLES), figsize=(3.4 * len(VIEW_TITLES), 0.45 * len(names) + 1.6),
                             sharey=True, squeeze=False)
    for ax, (view, title) in zip(axes[0], VIEW_TITLES):
        for g, group in enumerate(groups):
            off = (g - (len(groups) - 1) / 2) * 0.22
            for i, name in enumerate(names):
                a = summary[group][name][view]
                y = i + off
                med, (lo, hi) = a["median"], a["median_ci"]
                clip = lambda v: min(max(v, 1e-2), 1e2)  # noqa: E731  (never / 0 drawn at the edge)
                ax.plot([clip(lo), clip(hi)], [y, y], color=f"C{g}", lw=1.5)
                ax.plot(clip(med), y, "o", color=f"C{g}", ms=4, label=group if i == 0 else None)
                ax.plot(clip(a["iqm"]), y, "x", color=f"C{g}", ms=4)
        ax.axvline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_title(title + (" (higher better)" if view == "train_speedup" else " (lower better)"), fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_yticks(range(len(names)))
    axes[0][0].set_yticklabels(names, fontsize=7)
    axes[0][0].invert_yaxis()
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"vs Adam tuned per task, {horizon} steps: median (dot) with 95% bootstrap interval, IQM (x); "
                 "1 = tuned Adam", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)

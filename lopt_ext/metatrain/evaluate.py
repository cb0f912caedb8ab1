"""Evaluation: a learned optimizer vs Adam tuned by a learning-rate sweep, on task-family tasks.

Protocol (``evaluate``): for each task, ``steps`` inner steps from ``seeds`` initialisations
(seed s: params init key PRNGKey(s), batch stream key fold_in(PRNGKey(s), 1), the same for every
optimiser). Adam runs every learning rate of a log grid (default 9 values, 1e-4 .. 1 in half decades) and the
best one is picked per task on the mean final TRAINING loss (full training set). The learned
optimiser's number of steps to reach that loss is the first recorded point (every ``every``
steps) where its mean training-loss curve is <= Adam's best final mean; ratio = that / steps.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

DEFAULT_LRS = tuple(float(x) for x in np.logspace(-4, 0, 9))  # 1e-4 .. 1, half decades


def _init_run(task, seed):
    key = jax.random.PRNGKey(seed)
    return task.init(key), jax.random.fold_in(key, 1)


@functools.lru_cache(maxsize=None)
def _curve_fn(task, make_tx, steps: int, every: int):
    """jit(vmap over members) of a training run that records train_loss every ``every`` steps.

    make_tx(hp) -> optax transformation; hp is the per-member hyper-parameter (traced)."""
    n_chunks = steps // every

    def run(hp, seed_key, params):
        tx = make_tx(hp)
        state = tx.init(params)

        def step(carry, i):
            params, state = carry
            batch = task.sample_batch(jax.random.fold_in(seed_key, i))
            loss, grads = jax.value_and_grad(task.loss)(params, batch)
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        def chunk(carry, c):
            carry, _ = lax.scan(step, carry, c * every + jnp.arange(every))
            return carry, task.train_loss(carry[0])

        (params, _), curve = lax.scan(chunk, (params, state), jnp.arange(n_chunks))
        curve = jnp.concatenate([jnp.full((1,), jnp.nan, curve.dtype), curve])  # slot 0: init loss, filled by caller
        return curve, task.eval_loss(params)

    return jax.jit(jax.vmap(run))


def run_curves(task, make_tx, hps, seeds, steps=1000, every=10):
    """(curves [len(hps), len(seeds), steps//every + 1], final eval losses [len(hps), len(seeds)])."""
    hps = jnp.asarray(hps, jnp.float32)
    H, S = hps.shape[0], len(seeds)
    inits = [_init_run(task, s) for s in seeds]
    params = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *[p for p, _ in inits])
    keys = jnp.stack([k for _, k in inits])
    init_loss = jax.vmap(task.train_loss)(params)
    rep = lambda x: jnp.broadcast_to(x[None], (H,) + x.shape).reshape((H * S,) + x.shape[1:])
    fn = _curve_fn(task, make_tx, steps, every)
    curves, evals = fn(jnp.repeat(hps, S), rep(keys), jax.tree_util.tree_map(rep, params))
    curves = np.array(curves).reshape(H, S, -1)
    curves[:, :, 0] = np.asarray(init_loss)[None, :]
    return curves, np.asarray(evals).reshape(H, S)


def adam_tx(lr):
    return optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(lr))


def lopt_tx_factory(lopt, theta, impl="fused"):
    return lambda _hp: lopt.transform(theta, impl=impl)


def steps_to_reach(curve_mean, target, every):
    """First recorded step where the curve is <= target (None if never)."""
    hit = np.nonzero(np.asarray(curve_mean) <= target)[0]
    return None if hit.size == 0 else int(hit[0]) * every


def adam_sweep(task, seeds=(0, 1, 2), steps=1000, every=10, lrs=DEFAULT_LRS, cache: Optional[str] = None):
    """Adam over the learning-rate grid; independent of theta, so it can be cached in a JSON file."""
    key = json.dumps([task.name, list(seeds), steps, every, [float(x) for x in lrs]])
    store = {}
    if cache and os.path.exists(cache):
        with open(cache) as f:
            store = json.load(f)
        if key in store:
            return store[key]
    t0 = time.perf_counter()
    curves, evals = run_curves(task, adam_tx, lrs, seeds, steps, every)
    finals = np.nan_to_num(curves[:, :, -1].mean(1), nan=np.inf)
    best = int(np.argmin(finals))
    out = {"adam_lrs": [float(x) for x in lrs], "adam_best_lr": float(lrs[best]),
           "adam_final_train_by_lr": [float(x) if np.isfinite(x) else None for x in finals],
           "adam_final_train": float(finals[best]), "adam_final_train_std": float(curves[best, :, -1].std()),
           "adam_final_eval": float(evals[best].mean()), "adam_curve": curves[best].tolist(),
           "adam_time_s": time.perf_counter() - t0}
    if cache:
        if os.path.exists(cache):
            with open(cache) as f:
                store = json.load(f)
        store[key] = out
        from lopt_ext.checkpoint import atomic_write_bytes
        atomic_write_bytes(cache, json.dumps(store).encode())
    return out


def steps_to_stay(curve_mean, target, every):
    """First recorded step from which the curve stays <= target to the end (None if never)."""
    above = np.nonzero(~(np.asarray(curve_mean) <= target))[0]
    if above.size == 0:
        return 0
    last = int(above[-1]) + 1
    return None if last >= len(curve_mean) else last * every


def evaluate_task(task, lopt, theta, seeds=(0, 1, 2), steps=1000, every=10, lrs=DEFAULT_LRS,
                  impl="fused", adam_cache: Optional[str] = None) -> Dict[str, Any]:
    adam = adam_sweep(task, seeds, steps, every, lrs, cache=adam_cache)
    target = adam["adam_final_train"]
    t1 = time.perf_counter()
    l_curves, l_evals = run_curves(task, lopt_tx_factory(lopt, theta, impl), [0.0], seeds, steps, every)
    t2 = time.perf_counter()
    l_mean = l_curves[0].mean(0)
    reach = steps_to_reach(l_mean, target, every)
    adam_reach = steps_to_reach(np.mean(adam["adam_curve"], 0), target, every)
    res = {"task": task.name, "steps": steps, "seeds": list(seeds), "every": every}
    res.update({k: v for k, v in adam.items() if k != "adam_curve"})
    res.update({
        "lopt_final_train": float(l_mean[-1]), "lopt_final_train_std": float(l_curves[0, :, -1].std()),
        "lopt_final_eval": float(l_evals[0].mean()),
        "lopt_steps_to_adam_final": reach, "adam_steps_to_own_final": adam_reach,
        "lopt_steps_to_stay_below_adam_final": steps_to_stay(l_mean, target, every),
        "ratio": (reach / steps) if reach is not None else None,
        "curves": {"adam_best": adam["adam_curve"], "lopt": l_curves[0].tolist()},
        "lopt_time_s": t2 - t1})
    return res


def evaluate(task_names: Sequence[str], lopt, theta, seeds=(0, 1, 2), steps=1000, every=10,
             lrs=DEFAULT_LRS, impl="fused", progress=True, adam_cache: Optional[str] = None,
             adam_only: bool = False) -> List[Dict[str, Any]]:
    from lopt_ext.tasks import family
    results = []
    it = task_names
    if progress:
        from tqdm import tqdm
        it = tqdm(task_names, desc="evaluate", dynamic_ncols=True)
    for name in it:
        task = family.get_task(name)
        if adam_only:
            adam_sweep(task, seeds, steps, every, lrs, cache=adam_cache)
            continue
        res = evaluate_task(task, lopt, theta, seeds, steps, every, lrs, impl, adam_cache)
        res["split"] = next(s for s in family.SPLITS if name in family.list_tasks(s))
        results.append(res)
    return results


def format_table(results) -> str:
    lines = ["| task | split | Adam best lr | Adam final train | LOpt final train | Adam eval | LOpt eval "
             "| LOpt steps to Adam's final (first touch) | ratio | LOpt stays below from |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        reach = r["lopt_steps_to_adam_final"]
        lines.append(
            f"| {r['task']} | {r.get('split', '')} | {r['adam_best_lr']:.2g} | {r['adam_final_train']:.4g} "
            f"| {r['lopt_final_train']:.4g} | {r['adam_final_eval']:.4g} | {r['lopt_final_eval']:.4g} "
            f"| {reach if reach is not None else 'not reached in ' + str(r['steps'])} "
            f"| {('%.2fx' % r['ratio']) if r['ratio'] is not None else '> 1x'} "
            f"| {_fmt_steps(r.get('lopt_steps_to_stay_below_adam_final'), r['steps'])} |")
    return "\n".join(lines)


def _fmt_steps(value, steps):
    return "never" if value is None else str(value)


def plot_curves(results, path, title="learned optimizer vs tuned Adam"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(results)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, r in zip(axes.ravel(), results):
        x = np.arange(len(r["curves"]["lopt"][0])) * r["every"]
        for key, label, color in (("adam_best", f"Adam lr={r['adam_best_lr']:.2g}", "C0"),
                                  ("lopt", "learned (pretrained)", "C3")):
            c = np.asarray(r["curves"][key], np.float64)
            ax.plot(x, np.nanmean(c, 0), color=color, label=label)
            ax.fill_between(x, np.nanmin(c, 0), np.nanmax(c, 0), color=color, alpha=0.2)
        ax.axhline(r["adam_final_train"], color="C0", ls=":", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{r['task']} ({r.get('split', '')})", fontsize=8)
        ax.set_xlabel("inner step")
        ax.set_ylabel("train loss")
        ax.legend(fontsize=7)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)

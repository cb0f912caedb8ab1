"""The README's main job: train a task-family model with the pretrained learned optimizer
(fused kernel, and the pure-JAX reference for comparison) and with Adam tuned by a short
learning-rate sweep; print a loss table with step times and optimizer-state memory; save a PNG."""
from __future__ import annotations

import time
from typing import Any, Dict

import jax
import numpy as np
import optax

from lopt_ext import timing
from lopt_ext.metatrain import evaluate as ev


def _state_bytes(state) -> int:
    return int(sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(state)))


def _time_step(task, tx, params, key, repeats=50) -> float:
    """Median seconds of one jitted training step (loss, grad, optimizer update, apply)."""
    @jax.jit
    def step(params, state, i):
        batch = task.sample_batch(jax.random.fold_in(key, i))
        loss, grads = jax.value_and_grad(task.loss)(params, batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    carry = [params, tx.init(params), 0]

    def run():  # one training step on the next batch, waiting for its result
        p, st, i = carry
        p, st, loss = step(p, st, i)
        jax.block_until_ready((p, st, loss))
        carry[:] = [p, st, i + 1]

    return timing.median_step_s(run, rounds=repeats, warmup=1)


def run_demo(task_name: str = "mlp_digits_48_relu_b64_s1", steps: int = 1000, seed: int = 0,
             png: str | None = None, pretrained_name: str | None = None, lrs=ev.DEFAULT_LRS) -> Dict[str, Any]:
    """Trains one task with the pretrained learned optimizer (fused kernel and reference) and
    with Adam tuned by a learning-rate sweep, judged as ``evaluate`` judges: smoothed held-out
    loss, steps from which the learned optimizer stays at or below tuned Adam's final one."""
    from lopt_ext import pretrained
    from lopt_ext.tasks import family
    task = family.get_task(task_name)
    pretrained_name = pretrained_name or pretrained.default_name()
    lopt, theta = pretrained.load(pretrained_name)
    n_params = task.num_params()
    every = ev.EVERY
    steps = max(ev.TRAIN_EVERY, steps - steps % ev.TRAIN_EVERY)
    print(f"task {task.name}: {n_params} parameters, {steps} steps, seed {seed}; "
          f"learned optimizer {pretrained_name} ({type(lopt).__name__}, hidden_size={lopt.hidden_size})")

    t0 = time.perf_counter()
    sweep, sweep_train = ev.run_curves(task, ev.adam_tx, lrs, [seed], steps, every)
    finals = ev.smooth(sweep[:, 0], every)[:, -1]
    best = int(np.argmin(np.where(np.isfinite(finals), finals, np.inf)))
    best_lr = float(lrs[best])
    print(f"Adam learning-rate sweep ({len(lrs)} values, {time.perf_counter() - t0:.1f} s): best lr {best_lr:.3g} "
          f"(on the final held-out loss)")

    params, key = ev._init_run(task, seed)
    rows, curves = [], {}
    horizon = steps  # the run's length: read by horizon-aware rules, ignored by the others
    for label, make_tx, tx in (
            ("learned (fused)", ev.lopt_tx_factory(lopt, theta, "fused", horizon),
             lopt.transform(theta, impl="fused", num_steps=horizon)),
            ("learned (reference)", ev.lopt_tx_factory(lopt, theta, "reference", horizon),
             lopt.transform(theta, impl="reference", num_steps=horizon)),
            (f"Adam lr={best_lr:.2g}", ev.adam_tx, ev.adam_tx(best_lr))):
        if label.startswith("Adam"):
            held, train = sweep[best:best + 1], sweep_train[best:best + 1]
        else:
            held, train = ev.run_curves(task, make_tx, [0.0], [seed], steps, every)
        curves[label] = ev.smooth(held[0, 0], every)
        step_s = _time_step(task, tx, params, key)
        rows.append({"optimizer": label, "final_held_out": float(curves[label][-1]),
                     "final_train": float(train[0, 0, -1]), "step_ms": step_s * 1e3,
                     "state_bytes_per_param": _state_bytes(tx.init(params)) / n_params})
    target = rows[-1]["final_held_out"]
    for r in rows:
        r["steps_to_stay_at_adam_final"] = ev.steps_to_stay(curves[r["optimizer"]], target, every, steps)

    header = (f"{'optimizer':<22}{'held-out':>10}{'train':>10}{'step ms':>9}{'state B/param':>15}"
              f"{'stays <= Adam from':>20}")
    print(header)
    print("-" * len(header))
    for r in rows:
        hit = r["steps_to_stay_at_adam_final"]
        hit = "(the target)" if r is rows[-1] else (str(hit) if hit is not None else "never")
        print(f"{r['optimizer']:<22}{r['final_held_out']:>10.4f}{r['final_train']:>10.4f}{r['step_ms']:>9.3f}"
              f"{r['state_bytes_per_param']:>15.1f}{hit:>20}")
    print(f"(held-out loss: {ev.SMOOTH}-step trailing mean at the last step; 'stays <= Adam from': first step "
          f"from which it stays at or below tuned Adam's final held-out loss)")
    if png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        x = np.arange(len(next(iter(curves.values())))) * every
        for label, c in curves.items():
            ax.plot(x, c, label=label, ls="--" if "reference" in label else "-")
        ax.axhline(target, color="grey", lw=0.6, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(f"held-out loss ({ev.SMOOTH}-step mean)")
        ax.set_title(task.name, fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        plt.close(fig)
        print(f"wrote {png}")
    return {"task": task.name, "best_lr": best_lr, "rows": rows, "steps": steps, "seed": seed,
            "pretrained": pretrained_name}


def plot_metaloss(log_path: str, png: str, window: int = 50) -> Dict[str, float]:
    """meta-loss vs outer step (raw and moving average) from a meta-train log.jsonl."""
    import json
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(log_path) as f:
        rows = [json.loads(l) for l in f if l.strip()]
    steps = np.asarray([r["step"] for r in rows])
    loss = np.asarray([r["meta_loss"] for r in rows])
    w = max(1, min(window, len(loss)))
    avg = np.convolve(loss, np.ones(w) / w, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, loss, alpha=0.3, lw=0.6, label="meta-loss (per outer step)")
    ax.plot(steps[w - 1:], avg, label=f"moving average ({w})")
    ax.set_xlabel("outer step")
    ax.set_ylabel("normalised mean inner training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return {"steps": int(steps[-1]), "first_avg": float(avg[0]), "last_avg": float(avg[-1])}

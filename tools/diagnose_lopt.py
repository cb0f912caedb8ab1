"""Why does a learned optimizer behave as it does on a task? One run, recorded per step.

    python tools/diagnose_lopt.py --task mlp_teacher16-103_128_relu_b256_s1 --steps 1000 \
        [--theta FILE | --pretrained NAME] --png diag.png --json diag.json

Per step (the pure-JAX reference path, so the MLP's outputs can be read): held-out loss,
global gradient norm, global update norm, the mean |direction| and mean magnitude outputs of
the per-parameter MLP, the RMS of the momentum-over-sqrt(rms) feature before normalisation
(a per-tensor signal-to-noise measure that small_fc_lopt's normalisation removes), and for a
ScaledSmallFcLOpt the per-tensor step scales. Writes a 2x3 plot and the raw series.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lopt_ext import pretrained  # noqa: E402
from lopt_ext.common import leaf_features, step_features  # noqa: E402
from lopt_ext.tasks import family  # noqa: E402


def mlp_outputs(lopt, theta, state, params, grads):
    """(mean |d|, mean mag, mean SNR feature RMS) over all elements, and per-leaf scales."""
    decays = lopt.decays(theta)
    nn = theta["nn"]["~"]
    feat = step_features(state.iteration)
    p_leaves, treedef = jax.tree_util.tree_flatten(params)
    g_leaves = treedef.flatten_up_to(grads)
    fields = [treedef.flatten_up_to(getattr(state, f)) for f in lopt.state_fields]
    d_abs, mags, snr, count = 0.0, 0.0, [], 0
    for i, (p, g) in enumerate(zip(p_leaves, g_leaves)):
        m, rms, vr, vc, vf = (f[i] for f in fields[:5])
        if p.ndim == 0:
            p, g, m, rms, vf = p[None], g[None], m[None], rms[None], vf[None]
        x, m_new, rms_new, *_ = leaf_features(lopt, decays, p, g, m, rms, vr, vc, vf)
        snr.append(float(jnp.sqrt(jnp.mean(jnp.square(m_new * jax.lax.rsqrt(rms_new + 1e-6))))))
        x = x * jax.lax.rsqrt(1e-5 + jnp.mean(jnp.square(x), axis=tuple(range(p.ndim)), keepdims=True))
        x = jnp.concatenate([x, jnp.broadcast_to(feat, p.shape + feat.shape)], axis=-1)
        for k in range(lopt.hidden_layers + 1):
            x = x @ nn[f"w{k}"] + nn[f"b{k}"]
            if k < lopt.hidden_layers:
                x = jax.nn.relu(x)
        d_abs += float(jnp.sum(jnp.abs(x[..., 0])))
        mags += float(jnp.sum(x[..., 1]))
        count += int(np.prod(p.shape))
    scales = None
    if lopt.has_step_scales:  # as the step computes them: from the new state of each leaf
        leaves = [(jnp.asarray(p, jnp.float32), jnp.asarray(g, jnp.float32), *(f[i] for f in fields))
                  for i, (p, g) in enumerate(zip(p_leaves, g_leaves))]
        new = [res[1:] for res in lopt.reference_leaves(theta, state.iteration, leaves)]
        scales = [float(s) for s in lopt.step_scales(theta, state.iteration, leaves, new)]
    return d_abs / count, mags / count, float(np.mean(snr)), scales


def diagnose(task, lopt, theta, steps, seed=0):
    key = jax.random.PRNGKey(seed)
    params, data_key = task.init(key), jax.random.fold_in(key, 1)
    tx = lopt.transform(theta, impl="reference")
    state = tx.init(params)
    grad_fn = jax.jit(jax.value_and_grad(task.loss))
    update = jax.jit(tx.update)
    eval_loss = jax.jit(task.eval_loss)
    rec = {k: [] for k in ("held_out", "grad_norm", "update_norm", "mean_abs_direction", "mean_magnitude",
                           "snr_feature_rms", "scales")}
    for i in range(steps):
        _, grads = grad_fn(params, task.sample_batch(jax.random.fold_in(data_key, i)))
        d, mag, snr, scales = mlp_outputs(lopt, theta, state, params, grads)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        rec["held_out"].append(float(eval_loss(params)))
        rec["grad_norm"].append(float(optax.global_norm(grads)))
        rec["update_norm"].append(float(optax.global_norm(updates)))
        rec["mean_abs_direction"].append(d)
        rec["mean_magnitude"].append(mag)
        rec["snr_feature_rms"].append(snr)
        rec["scales"].append(scales)
    return rec


def plot(rec, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    x = np.arange(1, len(rec["held_out"]) + 1)
    panels = [("held_out", "held-out loss", True), ("grad_norm", "global gradient norm", True),
              ("update_norm", "global update norm", True), ("mean_abs_direction", "mean |direction| output", True),
              ("snr_feature_rms", "RMS of m/sqrt(rms) before normalisation", True), ("scales", "per-tensor step scales", True)]
    for ax, (key, label, log) in zip(axes.ravel(), panels):
        if key == "scales":
            if rec["scales"][0] is None:
                ax.plot(x, rec["mean_magnitude"], color="C1")
                label = "mean magnitude output (x exp_mult in the step)"
                log = False
            else:
                ax.plot(x, np.asarray(rec["scales"]), lw=0.8)
        else:
            ax.plot(x, rec[key], lw=0.8)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        if log:
            ax.set_yscale("log")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="mlp_teacher16-103_128_relu_b256_s1")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--theta", default=None, help="theta .safetensors (default: the shipped pretrained one)")
    src.add_argument("--pretrained", default=None, choices=pretrained.list_pretrained())
    ap.add_argument("--png", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("argument --steps: must be >= 1")
    task = family.get_task(args.task)
    lopt, theta, name = pretrained.resolve(args.theta, args.pretrained)
    rec = diagnose(task, lopt, theta, args.steps, args.seed)
    for s in (10, 100, 300, 1000, 3000):
        if s <= args.steps:
            print(f"step {s:5d}: held-out {rec['held_out'][s - 1]:.4g}  |g| {rec['grad_norm'][s - 1]:.3g}  "
                  f"|update| {rec['update_norm'][s - 1]:.3g}  mean|d| {rec['mean_abs_direction'][s - 1]:.3g}  "
                  f"snr-rms {rec['snr_feature_rms'][s - 1]:.3g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"task": task.name, "optimizer": name, **rec}, f)
    if args.png:
        plot(rec, args.png, f"{name} on {task.name}")
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()

"""Pure-JAX reference of small_fc_lopt (lopt_ext.config.SmallFcLOpt): the numerical truth (see the spec).

Written literally, tensor by tensor: it builds the (params x F) feature tensor and
runs the MLP on it, exactly the cost the fused kernels remove. Also the fallback
when the compiled extension is unavailable.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from lopt_ext.common import leaf_features, step_features

_HI = lax.Precision.HIGHEST  # no TF32/bf16 passes on accelerators: this is the truth


def leaf_step(lopt, decays, nn, step_feat, p, g, m, rms, v_row, v_col, v_full):
    """One tensor: returns (step, m, rms, v_row, v_col, v_full); p_new = p - step.

    p and g are float32 of shape S; the state follows SmallFcLOptState.
    """
    shape = p.shape
    if p.ndim == 0:  # a scalar is treated as shape [1]
        p, g, m, rms, v_full = p[None], g[None], m[None], rms[None], v_full[None]
    x, m, rms, v_row, v_col, v_full, _, _ = leaf_features(lopt, decays, p, g, m, rms, v_row, v_col, v_full)
    axes = tuple(range(p.ndim))
    x = x * lax.rsqrt(1e-5 + jnp.mean(jnp.square(x), axis=axes, keepdims=True))
    x = jnp.concatenate([x, jnp.broadcast_to(step_feat, p.shape + step_feat.shape)], axis=-1)
    for i in range(lopt.hidden_layers + 1):
        x = jnp.matmul(x, nn[f"w{i}"], precision=_HI) + nn[f"b{i}"]
        if i < lopt.hidden_layers:
            x = jax.nn.relu(x)
    step = x[..., 0] * jnp.exp(x[..., 1] * lopt.exp_mult) * lopt.step_mult
    if len(shape) == 0:
        step, m, rms, v_full = step[0], m[0], rms[0], v_full[0]
    return step.reshape(shape), m, rms, v_row, v_col, v_full


def step_leaves(lopt, theta, iteration, leaves):
    """Applies leaf_step to each (p, g, m, rms, v_row, v_col, v_full) tuple."""
    decays = lopt.decays(theta)
    feat = step_features(iteration)
    nn = theta["nn"]["~"]
    return [leaf_step(lopt, decays, nn, feat, *leaf) for leaf in leaves]

"""Pure-JAX reference of small_fc_lopt: the numerical truth (see the spec).

Written literally, tensor by tensor: it builds the (params x F) feature tensor and
runs the MLP on it, exactly the cost the fused kernels remove. Also the fallback
when the compiled extension is unavailable.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from lopt_ext.config import SmallFcLOpt, factored_dims, step_features

_HI = lax.Precision.HIGHEST  # no TF32/bf16 passes on accelerators: this is the truth


def _safe_rsqrt(x):
    return lax.rsqrt(jnp.maximum(x, 1e-9))


def leaf_features(lopt: SmallFcLOpt, decays, p, g, m, rms, v_row, v_col, v_full):
    """Accumulator updates and the un-normalised features of one tensor of rank >= 1.

    Returns (x [S + (28,)], m, rms, v_row, v_col, v_full, row_factor, col_factor); the
    factors are None for rank-1 tensors.
    """
    mom_b, rms_b, fac_b = decays
    m = mom_b * m + (1 - mom_b) * g[..., None]
    rms_c = jnp.clip(rms_b, 0.0, 1.0)
    rms = rms_c * rms + (1 - rms_c) * (g * g)[..., None]
    fac_c = jnp.clip(fac_b, 0.0, 1.0)
    gsq = g * g + 1e-30

    rsqrt_rms = lax.rsqrt(rms + 1e-6)
    feats = [g[..., None], p[..., None], m, rms, m * rsqrt_rms, rsqrt_rms]
    dims = factored_dims(p.shape)
    row_factor = col_factor = None
    if not lopt.has_adafactor:  # the ablation without Adafactor features
        pass
    elif dims is not None:
        d1, d0 = dims
        v_row = fac_c * v_row + (1 - fac_c) * jnp.mean(gsq, axis=d0)[..., None]
        v_col = fac_c * v_col + (1 - fac_c) * jnp.mean(gsq, axis=d1)[..., None]
        reduced_d1 = d1 - 1 if d1 > d0 else d1
        row_col_mean = jnp.mean(v_row, axis=reduced_d1, keepdims=True)
        row_factor = _safe_rsqrt(v_row / (row_col_mean + 1e-9))
        col_factor = _safe_rsqrt(v_col)
        rf = jnp.expand_dims(row_factor, d0)
        cf = jnp.expand_dims(col_factor, d1)
        full = p.shape + (v_row.shape[-1],)
        row_feat = jnp.broadcast_to(jnp.expand_dims(v_row, d0), full)
        col_feat = jnp.broadcast_to(jnp.expand_dims(v_col, d1), full)
        feats += [g[..., None] * rf * cf,
                  row_feat, col_feat, lax.rsqrt(row_feat + 1e-8), lax.rsqrt(col_feat + 1e-8),
                  m * rf * cf]
    else:
        v_full = fac_c * v_full + (1 - fac_c) * gsq[..., None]
        feats += [g[..., None] * _safe_rsqrt(v_full + 1e-9),
                  v_full, v_full, lax.rsqrt(v_full + 1e-8), lax.rsqrt(v_full + 1e-8),
                  m * (v_full + 1e-6) ** -0.5]
    x = jnp.concatenate(feats, axis=-1)
    return x, m, rms, v_row, v_col, v_full, row_factor, col_factor


def leaf_step(lopt: SmallFcLOpt, decays, nn, step_feat, p, g, m, rms, v_row, v_col, v_full):
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


def step_leaves(lopt: SmallFcLOpt, theta, iteration, leaves):
    """Applies leaf_step to each (p, g, m, rms, v_row, v_col, v_full) tuple."""
    decays = lopt.decays(theta)
    feat = step_features(iteration)
    nn = theta["nn"]["~"]
    return [leaf_step(lopt, decays, nn, feat, *leaf) for leaf in leaves]

"""Pieces several learned optimizers share: the step-count features, the factored axes, the
accumulators of small_fc_lopt (also Celo's) with their decay checks and features."""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# tanh(iteration / t - 1) for these timescales: the un-normalised step features.
STEP_TIMESCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)
MAX_DECAYS = 16


def num_normalized_features(dm: int, dr: int, da: int) -> int:
    """Per-tensor normalised features (28 for the default decays); see the spec."""
    return 2 + 2 * dm + 2 * dr + 6 * da


EMPTY_SHAPE = (0,)
DECAY_FIELDS = ("initial_momentum_decays", "initial_rms_decays", "initial_adafactor_decays")


def check_decay_fields(lopt, fewest_adafactor: int = 1) -> None:
    """Normalises lopt's three initial-decay fields to tuples of floats (on the frozen dataclass)
    and checks them: 1..MAX_DECAYS values (``fewest_adafactor`` for the Adafactor ones) in [0, 1)."""
    cls = type(lopt).__name__
    for name in DECAY_FIELDS:
        value = getattr(lopt, name)
        try:
            value = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise TypeError(f"{cls}: {name} must be a sequence of floats, got {value!r}") from None
        object.__setattr__(lopt, name, value)
        fewest = fewest_adafactor if name == "initial_adafactor_decays" else 1
        if not fewest <= len(value) <= MAX_DECAYS:
            raise ValueError(f"{cls}: {name} needs {fewest}..{MAX_DECAYS} values, got {len(value)}")
        # log(1 - beta0) must be finite: NaN, >= 1 or -inf would make every step NaN.
        if not all(np.isfinite(v) and 0.0 <= v < 1.0 for v in value):
            raise ValueError(f"{cls}: {name} must lie in [0, 1), got {value!r}")


def accumulator_shapes(shape, dm: int, dr: int, da: int):
    """Shapes of (m, rms, v_row, v_col, v_full) for a parameter of ``shape`` (small_fc_lopt's
    accumulators, also Celo's); unused slots are (0,)."""
    shape = tuple(int(d) for d in shape)
    if da == 0:  # no Adafactor features: no second-moment accumulators
        return shape + (dm,), shape + (dr,), EMPTY_SHAPE, EMPTY_SHAPE, EMPTY_SHAPE
    dims = factored_dims(shape)
    if dims is None:
        return shape + (dm,), shape + (dr,), EMPTY_SHAPE, EMPTY_SHAPE, shape + (da,)
    d1, d0 = dims
    v_row = tuple(np.delete(shape, d0).tolist()) + (da,)
    v_col = tuple(np.delete(shape, d1).tolist()) + (da,)
    return shape + (dm,), shape + (dr,), v_row, v_col, EMPTY_SHAPE


def fraction_steps(fraction, centers) -> jax.Array:
    """tanh(10 (fraction - c)) for each c in centers: soft steps over the fraction of the
    training horizon done, the schedule inputs of Celo and of ScaledSmallFcLOpt(horizon_inputs)."""
    return jnp.tanh((fraction - jnp.asarray(centers, jnp.float32)) * 10)


def step_features(iteration) -> jax.Array:
    """tanh(iteration / t - 1) for the 11 timescales (iteration before the increment)."""
    x = jnp.asarray(iteration).astype(jnp.float32)
    scales = jnp.asarray(STEP_TIMESCALES, jnp.float32)
    return jnp.tanh(x / scales - 1.0)


def factored_dims(shape) -> Tuple[int, int] | None:
    """(d1, d0): second-largest and largest axis by a stable ascending argsort; None below rank 2."""
    if len(shape) < 2:
        return None
    order = np.argsort(np.asarray(shape), kind="stable")
    return int(order[-2]), int(order[-1])


def safe_rsqrt(x):
    """rsqrt(max(x, 1e-9)): the factored features' guarded inverse root."""
    return lax.rsqrt(jnp.maximum(x, 1e-9))


def leaf_features(lopt, decays, p, g, m, rms, v_row, v_col, v_full):
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
        row_factor = safe_rsqrt(v_row / (row_col_mean + 1e-9))
        col_factor = safe_rsqrt(v_col)
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
        feats += [g[..., None] * safe_rsqrt(v_full + 1e-9),
                  v_full, v_full, lax.rsqrt(v_full + 1e-8), lax.rsqrt(v_full + 1e-8),
                  m * (v_full + 1e-6) ** -0.5]
    x = jnp.concatenate(feats, axis=-1)
    return x, m, rms, v_row, v_col, v_full, row_factor, col_factor

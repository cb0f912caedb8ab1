"""Optimizer state of small_fc_lopt, shared by the fused and the reference paths."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lopt_ext.config import SmallFcLOpt, factored_dims


class SmallFcLOptState(NamedTuple):
    """Per-step state. Each tree field mirrors the params tree.

    m: S + [Dm]; rms: S + [Dr]; rank >= 2 leaves use v_row (S without d0, + [Da]) and
    v_col (S without d1, + [Da]); rank 0/1 leaves use v_full (S + [Da]). Unused slots
    hold float32 arrays of shape (0,). All float32, whatever the parameter dtype.
    """

    iteration: jax.Array  # int32 scalar, +1 per applied step
    skipped: jax.Array    # int32 scalar, steps skipped for non-finite gradients
    m: Any
    rms: Any
    v_row: Any
    v_col: Any
    v_full: Any


EMPTY_SHAPE = (0,)


def leaf_state_shapes(lopt: SmallFcLOpt, shape):
    """Shapes of (m, rms, v_row, v_col, v_full) for a parameter of ``shape``."""
    shape = tuple(shape)
    dm, dr, da = lopt.num_decays
    dims = factored_dims(shape)
    if dims is None:
        v_row = v_col = EMPTY_SHAPE
        v_full = shape + (da,)
    else:
        d1, d0 = dims
        v_row = tuple(np.delete(shape, d0)) + (da,)
        v_col = tuple(np.delete(shape, d1)) + (da,)
        v_full = EMPTY_SHAPE
    return shape + (dm,), shape + (dr,), v_row, v_col, v_full


def init_state(lopt: SmallFcLOpt, params) -> SmallFcLOptState:
    if not isinstance(lopt, SmallFcLOpt):
        raise TypeError(f"lopt must be a lopt_ext.SmallFcLOpt, got {type(lopt).__name__}")
    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [leaf for _, leaf in paths]
    for path, leaf in paths:
        name = f"params{jax.tree_util.keystr(path)}"
        try:
            dtype = jnp.result_type(leaf)
        except Exception as e:
            raise TypeError(f"{name} must be an array, got {type(leaf).__name__} ({e})") from None
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"{name} must be floating point, got {dtype}")
    per_field = [[], [], [], [], []]
    for leaf in leaves:
        for field, shp in zip(per_field, leaf_state_shapes(lopt, jnp.shape(leaf))):
            field.append(jnp.zeros(tuple(int(d) for d in shp), jnp.float32))
    trees = [jax.tree_util.tree_unflatten(treedef, f) for f in per_field]
    return SmallFcLOptState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), *trees)

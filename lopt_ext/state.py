"""Optimizer states, shared by the fused and the reference paths of every learned optimizer."""
from __future__ import annotations

import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lopt_ext.base import LearnedOptimizer


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


class ScaledSmallFcLOptState(NamedTuple):
    """SmallFcLOptState plus, per leaf, the tensor's statistics at its first step:
    scale_ref = [log RMS(p_0), log RMS(g_0)] (float32 [2]), the reference of the progress
    inputs of ``ScaledSmallFcLOpt(progress_inputs=True)``."""

    iteration: jax.Array
    skipped: jax.Array
    m: Any
    rms: Any
    v_row: Any
    v_col: Any
    v_full: Any
    scale_ref: Any


def check_lopt(lopt) -> None:
    if not isinstance(lopt, LearnedOptimizer):
        raise TypeError(f"lopt must be a lopt_ext learned optimizer (SmallFcLOpt, ScaledSmallFcLOpt, MLPLOpt, Celo), "
                        f"got {type(lopt).__name__}")


def check_num_steps(num_steps, what="num_steps"):
    """None, or a positive int (the training horizon; rules that read it require it). A traced
    value (inside jit) passes unchecked."""
    if num_steps is None or isinstance(num_steps, jax.core.Tracer):
        return num_steps
    try:
        if isinstance(num_steps, bool):
            raise TypeError
        n = operator.index(num_steps)  # ints, numpy integers, integer 0-d arrays
    except TypeError:
        raise TypeError(f"{what} must be a positive int (the number of training steps), got {num_steps!r}") from None
    if not 1 <= n <= np.iinfo(np.int32).max:
        raise ValueError(f"{what} must be a positive int (the number of training steps), got {n}")
    return n


def init_state(lopt: LearnedOptimizer, params, num_steps=None):
    """The zero state of ``lopt`` for ``params`` (float32, whatever the parameter dtype).

    num_steps: the training horizon, kept in the state of rules that read it (Celo); the
    others ignore it. Without it such a rule needs num_steps at every step."""
    check_lopt(lopt)
    num_steps = check_num_steps(num_steps)
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
    per_field = [[] for _ in lopt.state_fields]
    for leaf in leaves:
        for field, shp in zip(per_field, lopt.leaf_state_shapes(jnp.shape(leaf))):
            field.append(jnp.zeros(tuple(int(d) for d in shp), jnp.float32))
    trees = {name: jax.tree_util.tree_unflatten(treedef, f) for name, f in zip(lopt.state_fields, per_field)}
    return lopt.state_type(iteration=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32), **trees,
                           **lopt.init_globals(num_steps))

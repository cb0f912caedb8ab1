"""Optimizer state for every learned optimizer (its layout: the rule's state_type and
leaf_state_shapes), shared by the fused and the reference paths."""
from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
import numpy as np

from lopt_ext.protocol import Rule


def check_lopt(lopt) -> None:
    if not isinstance(lopt, Rule):
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


def init_state(lopt: Rule, params, num_steps=None):
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

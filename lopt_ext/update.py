"""Input checks and the step shared by every implementation (fused, reference)."""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lopt_ext.protocol import Rule
from lopt_ext.state import check_lopt, check_num_steps  # noqa: F401  (re-exported: the one lopt check)

IMPLS = ("fused", "reference")
# skip_nonfinite skips a step unless every |g| <= this: sqrt(float32 max), so that g^2
# (rms and the factored accumulators) cannot overflow to inf either.
GRAD_LIMIT = float(np.sqrt(np.finfo(np.float32).max))


def _dtype(x, what):
    """dtype of an array-like leaf, or a TypeError naming it."""
    if x is None:
        raise TypeError(f"{what} must be an array, got None")
    try:
        return jnp.result_type(x)
    except Exception as e:  # e.g. a string or an arbitrary object in the tree
        raise TypeError(f"{what} must be an array, got {type(x).__name__} ({e})") from None


def _is_float(x, what="value") -> bool:
    return jnp.issubdtype(_dtype(x, what), jnp.floating)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_theta_finite(theta) -> None:
    """A concrete theta holding NaN/Inf is rejected (it would turn every output into NaN).

    Traced theta (inside jit, grad or vmap) cannot be inspected: there NaN propagates,
    as in the reference.
    """
    paths, _ = jax.tree_util.tree_flatten_with_path(theta)
    if not all(_is_concrete(x) for _, x in paths):
        return
    for path, x in paths:
        arr = np.asarray(x, np.float32)
        if not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise ValueError(f"theta{jax.tree_util.keystr(path)} holds {bad} non-finite value(s) (NaN/Inf); "
                             "every output would be NaN")


def check_theta(lopt: Rule, theta) -> None:
    """theta must have exactly the layout of this configuration (the reference's)."""

    def walk(expected, got, path):
        if isinstance(expected, dict):
            if not isinstance(got, Mapping):
                raise TypeError(f"theta{path} must be a dict, got {type(got).__name__}")
            if set(got) != set(expected):
                raise ValueError(f"theta{path} has keys {sorted(got)}; {lopt} expects {sorted(expected)}")
            for k in expected:
                walk(expected[k], got[k], f"{path}[{k!r}]")
            return
        _dtype(got, f"theta{path}")
        shape = tuple(jnp.shape(got))
        if shape != tuple(expected):
            raise ValueError(f"theta{path} has shape {shape}; {lopt} expects {tuple(expected)}")
        if not _is_float(got, f"theta{path}"):
            raise TypeError(f"theta{path} must be floating point, got {jnp.result_type(got)}")

    walk(lopt.theta_shapes(), theta, "")


def _leaf_names(tree):
    paths, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [jax.tree_util.keystr(p) or "<root>" for p, _ in paths]


def check_inputs(lopt: Rule, theta, state, params, grads, grads_name="grads"):
    """Validates everything before any kernel runs; returns flattened leaves."""
    check_lopt(lopt)
    check_theta(lopt, theta)
    p_leaves, treedef = jax.tree_util.tree_flatten(params)
    names = _leaf_names(params)
    try:
        g_leaves = treedef.flatten_up_to(grads)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{grads_name} must have the same tree structure as params: {e}") from None
    for name, p, g in zip(names, p_leaves, g_leaves):
        if not _is_float(p, f"params{name}"):
            raise TypeError(f"params{name} must be floating point, got {jnp.result_type(p)}")
        if not _is_float(g, f"{grads_name}{name}"):
            raise TypeError(f"{grads_name}{name} must be floating point, got {jnp.result_type(g)}")
        if jnp.shape(g) != jnp.shape(p):
            raise ValueError(f"{grads_name}{name} has shape {jnp.shape(g)}, params{name} has {jnp.shape(p)}")
    state_type = lopt.state_type
    if not isinstance(state, state_type):
        raise TypeError(f"state must be a {state_type.__name__} (from tx.init or init_state), got {type(state).__name__}")
    fields = []
    for fi, field in enumerate(lopt.state_fields):
        try:
            leaves = treedef.flatten_up_to(getattr(state, field))
        except (ValueError, TypeError) as e:
            raise ValueError(f"state.{field} does not match the params tree (a state from another model?): {e}") from None
        for name, p, leaf in zip(names, p_leaves, leaves):
            if _dtype(leaf, f"state.{field}{name}") != jnp.float32:
                raise TypeError(f"state.{field}{name} must be float32 (as init_state makes it), "
                                f"got {jnp.result_type(leaf)}")
            want = lopt.leaf_state_shapes(jnp.shape(p))[fi]
            if tuple(jnp.shape(leaf)) != tuple(want):
                raise ValueError(f"state.{field}{name} has shape {tuple(jnp.shape(leaf))}; params{name} of shape "
                                 f"{jnp.shape(p)} with {lopt} needs {tuple(want)} (a state from another model or config?)")
        fields.append(leaves)
    for name in ("iteration", "skipped"):
        value = getattr(state, name)
        if not jnp.issubdtype(_dtype(value, f"state.{name}"), jnp.integer):
            raise TypeError(f"state.{name} must be an integer scalar, got {jnp.result_type(value)}")
        if jnp.shape(value) != ():
            raise ValueError(f"state.{name} must be a scalar, got shape {jnp.shape(value)}")
    for name, (shape, dtype) in lopt.global_shapes().items():
        value = getattr(state, name)
        if _dtype(value, f"state.{name}") != dtype or tuple(jnp.shape(value)) != tuple(shape):
            raise TypeError(f"state.{name} must be {jnp.dtype(dtype).name} of shape {tuple(shape)} (as init_state "
                            f"makes it), got {jnp.result_type(value)} of shape {tuple(jnp.shape(value))}")
    return treedef, p_leaves, g_leaves, fields


def check_value(lopt: Rule, value, name: str = "value"):
    """The loss of the step (optax's ``value``; name="validation_value": a validation batch's
    loss): a real scalar where the rule reads it, else ignored."""
    if not (lopt.uses_loss if name == "value" else lopt.uses_validation_loss):
        return None
    what = "loss" if name == "value" else "loss on a validation batch (data it does not train on)"
    if value is None:
        raise ValueError(f"{type(lopt).__name__} reads the {what}: pass it as {name}= (tx.update(grads, state, "
                         f"params, {name}=...), or fused_update(..., {name}=...))")
    dtype = _dtype(value, name)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)) or jnp.shape(value) != ():
        raise TypeError(f"{name} (the {what}) must be a real scalar, got {dtype} of shape {jnp.shape(value)}")
    return jnp.asarray(value, jnp.float32)


def check_horizon(lopt: Rule, state, num_steps):
    """num_steps for this step: the call's, else the state's (init_state(..., num_steps))."""
    num_steps = check_num_steps(num_steps)
    if not lopt.uses_horizon or num_steps is not None:
        return num_steps
    stored = getattr(state, "num_steps", None)
    if stored is not None and _is_concrete(stored) and int(stored) < 1:
        raise ValueError(f"{type(lopt).__name__} reads the training horizon: pass num_steps= to transform, "
                         "init_state or fused_update")
    return None


def apply_step(lopt: Rule, theta, state, params, grads, *, impl: str,
               write_delta: bool, skip_nonfinite: bool = False, grads_name: str = "grads",
               value=None, num_steps=None, validation_value=None):
    """One step. Returns (tree of new params, or of updates when write_delta; new state).

    value: the loss, num_steps: the horizon, validation_value: a validation batch's loss (read
    by the rules that use them, else ignored).
    Everything is computed in float32; outputs take each parameter's dtype.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    treedef, p_leaves, g_leaves, fields = check_inputs(lopt, theta, state, params, grads, grads_name)
    value = check_value(lopt, value)
    validation_value = check_value(lopt, validation_value, "validation_value")
    num_steps = check_horizon(lopt, state, num_steps)
    check_theta_finite(theta)
    # Both paths compute in float32 (theta in float64 under x64 would make the reference's
    # state float64 and break the lax.cond below).
    theta = jax.tree_util.tree_map(lambda x: jnp.asarray(x).astype(jnp.float32), theta)
    live = [i for i, p in enumerate(p_leaves) if jnp.size(p) > 0]  # empty tensors: nothing to do
    f32 = lambda x: jnp.asarray(x).astype(jnp.float32)
    leaves = [(f32(p_leaves[i]), f32(g_leaves[i]), *(f[i] for f in fields)) for i in live]

    old_globals = {name: getattr(state, name) for name in lopt.global_fields}

    def step(_):
        extra = {"validation_value": validation_value} if validation_value is not None else {}
        context, new_globals = lopt.step_context(theta, state, value, num_steps, **extra)
        return leaf_steps(context), {**old_globals, **new_globals}

    def leaf_steps(context):
        if not leaves:
            return []
        # only rules with a per-step context get one (rules written before it need not take it)
        ctx = {} if context is None else {"context": context}
        if impl == "fused":
            if not lopt.has_step_scales:
                return lopt.fused_leaves(theta, state.iteration, leaves, write_delta=write_delta, **ctx)
            res = lopt.fused_leaves(theta, state.iteration, leaves, write_delta=True, **ctx)
            steps = [-out for out, *_ in res]
            rests = [rest for _, *rest in res]
        else:
            res = lopt.reference_leaves(theta, state.iteration, leaves, **ctx)
            steps = [s for s, *_ in res]
            rests = [rest for _, *rest in res]
        if lopt.has_step_scales:  # from the new accumulators the step itself produced
            scales = lopt.step_scales(theta, state.iteration, leaves, rests, impl=impl, **ctx)
            steps = [s * c for s, c in zip(steps, scales)]
            decays = lopt.step_decays(theta, state.iteration, leaves, rests, scales)
            if decays is not None:
                steps = [s + d * leaf[0] for s, d, leaf in zip(steps, decays, leaves)]
        return [((-s) if write_delta else (leaf[0] - s), *rest) for s, rest, leaf in zip(steps, rests, leaves)]

    def skip(_):  # the identity step: zero updates (or the same params), same state
        return ([((jnp.zeros_like(leaf[0]) if write_delta else leaf[0]), *leaf[2:]) for leaf in leaves],
                old_globals)

    finite = jnp.bool_(True)
    if skip_nonfinite and leaves:
        finite = count_bad_grads([leaf[1] for leaf in leaves]) == 0
        for loss in (value, validation_value):  # a NaN/Inf loss would poison a loss-reading rule's state
            if loss is not None:
                finite = finite & jnp.isfinite(loss)
        results, new_globals = lax.cond(finite, step, skip, None)
    else:
        results, new_globals = step(None)
    return assemble(lopt, treedef, p_leaves, fields, live, results, finite, state, write_delta, new_globals)


def count_bad_grads(grads) -> jax.Array:
    """Entries that make skip_nonfinite skip a step: NaN, +-Inf and |g| > GRAD_LIMIT (NaN
    compares False)."""
    return sum(jnp.sum(~(jnp.abs(jnp.asarray(g, jnp.float32)) <= GRAD_LIMIT)).astype(jnp.int32)
               for g in grads)


def assemble(lopt, treedef, p_leaves, fields, live, results, applied, state, write_delta, new_globals=None):
    """(tree of outputs, new state) from the per-live-leaf step results.

    results[k] = (out, *new state fields) for leaf live[k]; leaves not in live
    keep their state and get zero updates (or their params); applied: whether the step
    counted (False when skip_nonfinite skipped it).
    """
    outs = [jnp.zeros_like(p) if write_delta else p for p in p_leaves]
    new_fields = [list(f) for f in fields]
    for i, res in zip(live, results):
        outs[i] = res[0].astype(jnp.result_type(p_leaves[i]))
        for f, value in zip(new_fields, res[1:]):
            f[i] = value
    unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)
    applied = jnp.asarray(applied).astype(jnp.int32)
    new_state = lopt.state_type(
        iteration=state.iteration + applied,
        skipped=state.skipped + (1 - applied),
        **{name: unflat(f) for name, f in zip(lopt.state_fields, new_fields)},
        **(new_globals or {}))
    return unflat(outs), new_state


def fused_update(lopt: Rule, theta, state, params, grads, *, impl: str = "fused",
                 skip_nonfinite: bool = False, value=None, num_steps=None, validation_value=None):
    """(new_params, new_state) for one step of the learned optimizer on a whole pytree.

    Argument order: ``params`` comes BEFORE ``grads`` here, while optax's
    ``tx.update(grads, state, params)`` takes the gradients first. Swapped arguments of equal
    shapes cannot be detected and run silently, so pass both by keyword:
    ``fused_update(lopt, theta, state, params=params, grads=grads)``.

    value: the loss at params; num_steps: the training horizon (for this step, instead of the
    one init_state kept); validation_value: the loss on a validation batch. Rules that read
    them (Celo; ScaledSmallFcLOpt with loss inputs) require them; the others ignore them.
    """
    return apply_step(lopt, theta, state, params, grads, impl=impl, write_delta=False,
                      skip_nonfinite=skip_nonfinite, value=value, num_steps=num_steps,
                      validation_value=validation_value)

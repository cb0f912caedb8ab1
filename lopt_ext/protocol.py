"""The rule protocol: what every learned optimizer of lopt_ext provides, so that one set of
machinery (lopt_ext.state, lopt_ext.update, lopt_ext.optax_api) serves all.

A learned optimizer is a frozen dataclass (the reference's keyword names) that fulfils ``Rule``
(in practice by inheriting from ``lopt_ext.base.LearnedOptimizer``, which adds ``transform``):
- ``theta_shapes()`` / ``init_theta(key)``: its meta-parameters, in the reference's layout;
- ``state_type`` (a NamedTuple with ``iteration``, ``skipped`` and one tree per name in
  ``state_fields``) and ``leaf_state_shapes(shape)``: the float32 state of one parameter;
- ``reference_leaves(theta, iteration, leaves, context)``: the pure-JAX rule, per leaf
  (p, g, *state fields) -> (step, *new state fields), p_new = p - step;
- ``fused_leaves(theta, iteration, leaves, write_delta, context)``: the same through its
  compiled kernel, per leaf -> (p_new or -step, *new state fields);
- optionally, for rules that read the loss or the horizon (``uses_loss``, ``uses_horizon``;
  lopt_ext.celo): ``global_fields`` (state fields that are arrays, not per-leaf trees) with
  ``global_shapes()`` and ``init_globals(num_steps)``, and ``step_context(theta, state, value,
  num_steps)`` -> (context passed to the leaves functions, new global fields), with
  ``validation_value=`` too for a rule that reads a validation loss (``uses_validation_loss``);
- optionally ``has_step_scales = True`` and ``step_scales(theta, iteration, leaves, new_state, impl)``
  (plus ``context=`` for a rule with a step context): per-tensor multipliers of the step, from
  the leaves and the new state fields of each, and
  ``step_decays`` (the same arguments and those scales): None, or per tensor a weight decay
  lambda added to the scaled step, scale * step + lambda * p (see lopt_ext.scaled).
Input validation, state initialisation, the skip rule, dtype handling and the optax wrapper
are written once against this protocol and import nothing of any one optimizer.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np


MAX_HIDDEN = 256
MAX_HIDDEN_LAYERS = 16


class Rule:
    """The protocol (see the module docstring); the methods below raise until a rule defines them."""

    state_fields: Tuple[str, ...] = ()
    global_fields: Tuple[str, ...] = ()  # state fields that are not per-leaf trees
    uses_loss = False      # True: every step needs the loss (optax's ``value``)
    loss_source = "train"  # which loss ``value`` must be: "train" (the step's minibatch) or "validation"
    uses_validation_loss = False  # True: every step also needs a validation-batch loss (``validation_value``)
    uses_horizon = False   # True: the step needs num_steps, the length of training

    def _check_mlp_fields(self) -> None:
        """hidden_size / hidden_layers ints in range, exp_mult / step_mult finite floats: the
        per-parameter MLP every learned optimizer here has."""
        cls = type(self).__name__
        for name, upper in (("hidden_size", MAX_HIDDEN), ("hidden_layers", MAX_HIDDEN_LAYERS)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= upper:
                raise ValueError(f"{cls}: {name} must be an int in [1, {upper}], got {value!r}")
        for name in ("exp_mult", "step_mult"):
            value = getattr(self, name)
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"{cls}: {name} must be a float, got {value!r}") from None
            if not np.isfinite(value):
                raise ValueError(f"{cls}: {name} must be finite, got {value!r}")

    @property
    def state_type(self):
        raise NotImplementedError

    def theta_shapes(self) -> Dict[str, Any]:
        raise NotImplementedError

    def init_theta(self, key):
        raise NotImplementedError

    def leaf_state_shapes(self, shape) -> Tuple[Tuple[int, ...], ...]:
        raise NotImplementedError

    def reference_leaves(self, theta, iteration, leaves, context=None) -> List[tuple]:
        raise NotImplementedError

    def fused_leaves(self, theta, iteration, leaves, *, write_delta: bool, context=None) -> List[tuple]:
        raise NotImplementedError(f"{type(self).__name__} has no fused kernel: use impl='reference'")

    def global_shapes(self) -> Dict[str, Any]:
        """name -> (shape, dtype) of each of ``global_fields``."""
        return {}

    def init_globals(self, num_steps) -> Dict[str, Any]:
        return {}

    def step_context(self, theta, state, value, num_steps):
        """(context for the leaves functions, new global fields) of one step; value is the
        loss and num_steps the horizon (None where the caller gave none)."""
        return None, {}

    has_step_scales = False  # True: step_scales multiplies each tensor's step

    def step_scales(self, theta, iteration, leaves, new_state, impl: str = "reference"):
        """Per leaf the multiplier of its step; leaves[i] = (p, g, *old state fields),
        new_state[i] = the leaf's new state fields; impl: the step's ("fused" may use the
        kernels for the scale's own reductions)."""
        raise NotImplementedError

    def step_decays(self, theta, iteration, leaves, new_state, scales):
        """None (no decay), or per leaf the lambda of a weight decay: the step becomes
        scale * step + lambda * p; ``scales`` are step_scales' for the same arguments."""
        return None

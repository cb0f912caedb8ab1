"""small_fc_lopt (learned_optimization's AdafacMLPLOpt): its configuration, meta-parameters
(theta), state and kernel packing; its pure-JAX rule is lopt_ext.reference."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from lopt_ext import _ffi, reference
from lopt_ext.base import LearnedOptimizer
from lopt_ext.common import (STEP_TIMESCALES, accumulator_shapes, check_decay_fields, num_normalized_features,
                             step_features)

Theta = Dict[str, Any]


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


@dataclasses.dataclass(frozen=True)
class SmallFcLOpt(LearnedOptimizer):
    """AdafacMLPLOpt / small_fc_lopt configuration, with the reference's keyword names.

    ``SmallFcLOpt(hidden_size=32)`` is PyLO's ``small_fc_lopt``; the defaults are
    learned_optimization's (hidden_size=4).
    """

    hidden_size: int = 4
    hidden_layers: int = 2
    exp_mult: float = 0.001
    step_mult: float = 0.001
    initial_momentum_decays: Tuple[float, ...] = (0.9, 0.99, 0.999)
    initial_rms_decays: Tuple[float, ...] = (0.999,)
    initial_adafactor_decays: Tuple[float, ...] = (0.9, 0.99, 0.999)

    def __post_init__(self):
        # no adafactor decays: the ablation without the row/column (Adafactor) features
        check_decay_fields(self, fewest_adafactor=0)
        self._check_mlp_fields()
        dm, dr, da = self.num_decays
        if da not in (0, dm):
            raise ValueError(
                f"SmallFcLOpt: initial_adafactor_decays has {da} values but initial_momentum_decays "
                f"has {dm}; the reference broadcasts momentum against the factored terms, so they must match "
                f"(or be empty: no Adafactor features)")
        if dr not in (1, dm):
            raise ValueError(
                f"SmallFcLOpt: initial_rms_decays must have 1 or {dm} (momentum count) values, got {dr}")

    @property
    def has_adafactor(self) -> bool:
        """False for the ablation without row/column (Adafactor) accumulators and features."""
        return bool(self.initial_adafactor_decays)

    @property
    def num_decays(self) -> Tuple[int, int, int]:
        return (len(self.initial_momentum_decays), len(self.initial_rms_decays),
                len(self.initial_adafactor_decays))

    @property
    def num_features(self) -> int:
        """Normalised per-tensor features (F - 11)."""
        return num_normalized_features(*self.num_decays)

    @property
    def num_inputs(self) -> int:
        """MLP input width F: normalised features plus step features (39 by default)."""
        return self.num_features + len(STEP_TIMESCALES)

    def layer_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Shapes of theta['nn']['~'] entries, as haiku names them (w0, b0, ..., wL, bL)."""
        shapes = {}
        fan_in = self.num_inputs
        widths = [self.hidden_size] * self.hidden_layers + [2]
        for i, width in enumerate(widths):
            shapes[f"w{i}"] = (fan_in, width)
            shapes[f"b{i}"] = (width,)
            fan_in = width
        return shapes

    def theta_shapes(self) -> Theta:
        dm, dr, da = self.num_decays
        return {"momentum_decays": (dm,), "rms_decays": (dr,), "adafactor_decays": (da,),
                "nn": {"~": self.layer_shapes()}}

    def init_theta(self, key: jax.Array) -> Theta:
        """Fresh meta-parameters in learned_optimization's AdafacMLPLOpt layout.

        Weights: truncated normal (at 2 stddev) with stddev 1/sqrt(fan_in); biases
        and decay offsets zero.
        """
        nn = {}
        shapes = self.layer_shapes()
        keys = jax.random.split(key, self.hidden_layers + 1)
        for i in range(self.hidden_layers + 1):
            fan_in, width = shapes[f"w{i}"]
            std = 1.0 / np.sqrt(fan_in)
            nn[f"w{i}"] = std * jax.random.truncated_normal(keys[i], -2.0, 2.0, (fan_in, width), jnp.float32)
            nn[f"b{i}"] = jnp.zeros((width,), jnp.float32)
        dm, dr, da = self.num_decays
        return {"momentum_decays": jnp.zeros((dm,), jnp.float32),
                "rms_decays": jnp.zeros((dr,), jnp.float32),
                "adafactor_decays": jnp.zeros((da,), jnp.float32),
                "nn": {"~": nn}}

    def decays(self, theta: Theta):
        """(momentum, rms, adafactor) decays in float32, before clipping.

        beta = 1 - exp(10 * (log(1 - beta0) / 10 + offset)), computed as the reference does.
        """
        def to_decay(initial, offset):
            param = jnp.log(1 - jnp.asarray(initial, jnp.float32)) / 10.0 + offset
            return 1 - jnp.exp(param * 10.0)

        return (to_decay(self.initial_momentum_decays, theta["momentum_decays"]),
                to_decay(self.initial_rms_decays, theta["rms_decays"]),
                to_decay(self.initial_adafactor_decays, theta["adafactor_decays"]))

    # ----- the LearnedOptimizer protocol (lopt_ext.base)
    state_fields = ("m", "rms", "v_row", "v_col", "v_full")

    @property
    def state_type(self):
        return SmallFcLOptState

    def leaf_state_shapes(self, shape):
        """Shapes of (m, rms, v_row, v_col, v_full) for a parameter of ``shape``; unused slots
        are (0,)."""
        return accumulator_shapes(shape, *self.num_decays)

    def reference_leaves(self, theta: Theta, iteration, leaves, context=None):
        return reference.step_leaves(self, theta, iteration, leaves)

    def fused_leaves(self, theta: Theta, iteration, leaves, *, write_delta: bool, context=None):
        """One lopt_fused_update call for all leaves (p, g, m, rms, v_row, v_col, v_full):
        per leaf (p_new or -step, m, rms, v_row, v_col, v_full)."""
        return _ffi.accumulator_call(_ffi.FUSED_UPDATE, [self.pack_theta(theta, iteration)], leaves,
                                     self.has_adafactor, write_delta,
                                     dict(**self.kernel_attrs(), **_ffi.precision_attrs()))

    # ----- the kernel's view (csrc/kernels/lopt_config.h)
    def kernel_attrs(self) -> dict:
        """The FFI attributes of every small_fc_lopt kernel call (the configuration)."""
        dm, dr, da = self.num_decays
        return dict(hidden_size=np.int64(self.hidden_size), hidden_layers=np.int64(self.hidden_layers),
                    dm=np.int64(dm), dr=np.int64(dr), da=np.int64(da),
                    exp_mult=np.float32(self.exp_mult), step_mult=np.float32(self.step_mult))

    def pack_theta(self, theta: Theta, iteration) -> jax.Array:
        """The per-member float32 buffer the kernels read (PackedLayout). The step features
        are identical for every element, so they are folded into b0 here."""
        mom_b, rms_b, fac_b = self.decays(theta)
        rms_c = jnp.clip(rms_b, 0.0, 1.0)
        fac_c = jnp.clip(fac_b, 0.0, 1.0)
        nn = theta["nn"]["~"]
        nf = self.num_features
        w0 = nn["w0"].astype(jnp.float32)
        b0 = nn["b0"] + jnp.matmul(step_features(iteration), w0[nf:], precision=jax.lax.Precision.HIGHEST)
        parts = [mom_b, 1 - mom_b, rms_c, 1 - rms_c, fac_c, 1 - fac_c, w0[:nf].ravel(), b0]
        for i in range(1, self.hidden_layers + 1):
            parts += [nn[f"w{i}"].ravel(), nn[f"b{i}"]]
        packed = jnp.concatenate([jnp.asarray(x, jnp.float32).ravel() for x in parts])
        expected = _ffi.packed_size(self.hidden_size, self.hidden_layers, *self.num_decays)
        assert packed.shape == (expected,), (packed.shape, expected)
        return packed

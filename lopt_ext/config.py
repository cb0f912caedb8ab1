"""The small_fc_lopt configuration and its meta-parameters (theta)."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from lopt_ext.base import LearnedOptimizer

# tanh(iteration / t - 1) for these timescales: the un-normalised step features.
STEP_TIMESCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)
MAX_DECAYS = 16

Theta = Dict[str, Any]


def num_normalized_features(dm: int, dr: int, da: int) -> int:
    """Per-tensor normalised features (28 for the default decays); see the spec."""
    return 2 + 2 * dm + 2 * dr + 6 * da


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
        from lopt_ext.state import SmallFcLOptState
        return SmallFcLOptState

    def leaf_state_shapes(self, shape):
        """Shapes of (m, rms, v_row, v_col, v_full) for a parameter of ``shape``; unused slots
        are (0,)."""
        return accumulator_shapes(shape, *self.num_decays)

    def reference_leaves(self, theta: Theta, iteration, leaves, context=None):
        from lopt_ext import reference
        return reference.step_leaves(self, theta, iteration, leaves)

    def fused_leaves(self, theta: Theta, iteration, leaves, *, write_delta: bool, context=None):
        from lopt_ext import _ffi
        return _ffi.step_leaves(self, theta, iteration, leaves, write_delta=write_delta)


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

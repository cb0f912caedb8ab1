"""MLPLOpt ("LOLv2"): learned_optimization's per-parameter MLP learned optimizer.

impl="reference" is the pure-JAX rule below; impl="fused" runs the CPU kernel
(csrc/kernels/lopt_mlp_cpu.cc): one pass for the feature statistics, one for the MLP.

The rule (shared/spec/mlp_lopt.md; learned_optimization learned_optimizers/mlp_lopt.py):
6 momentum accumulators with fixed decays, m <- b m + (1 - b) g (the new momenta feed the
features); per tensor the 8 features g, p, m[0..5] are each divided by their root mean square
over the tensor (x rsqrt(1e-5 + mean x^2)); the 11 tanh step features follow, un-normalised;
a haiku MLP 19 -> H x L -> 2 with ReLU; step = d * exp(mag * exp_mult) * step_mult,
p <- p - step. A scalar parameter is treated as shape (1,).

theta is haiku's ``hk.nets.MLP`` parameter dict, exactly as learned_optimization stores it:
{"mlp/~/linear_0": {"w": [19, H], "b": [H]}, ..., "mlp/~/linear_L": {"w": [H, 2], "b": [2]}}.
Its state is 6 floats per parameter (no second moments), float32 whatever the parameter dtype.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lopt_ext import _ffi
from lopt_ext.base import LearnedOptimizer
from lopt_ext.common import step_features

MOMENTUM_DECAYS = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
NUM_NORMALIZED = 2 + len(MOMENTUM_DECAYS)       # g, p, m[6]
NUM_INPUTS = NUM_NORMALIZED + 11                # + the tanh step features = 19
_HI = lax.Precision.HIGHEST


class MLPLOptState(NamedTuple):
    """iteration / skipped: int32 scalars; m: a tree like params, each leaf S + [6] float32."""
    iteration: jax.Array
    skipped: jax.Array
    m: Any


@dataclasses.dataclass(frozen=True)
class MLPLOpt(LearnedOptimizer):
    """learned_optimization's MLPLOpt, with its keyword names and defaults."""

    hidden_size: int = 32
    hidden_layers: int = 2
    exp_mult: float = 0.001
    step_mult: float = 0.001

    def __post_init__(self):
        self._check_mlp_fields()

    # ----- theta
    def layer_shapes(self):
        widths = [self.hidden_size] * self.hidden_layers + [2]
        shapes, fan_in = {}, NUM_INPUTS
        for i, width in enumerate(widths):
            shapes[f"mlp/~/linear_{i}"] = {"w": (fan_in, width), "b": (width,)}
            fan_in = width
        return shapes

    def theta_shapes(self):
        return self.layer_shapes()

    def init_theta(self, key):
        """haiku's MLP init: weights truncated normal (2 stddev) with stddev 1/sqrt(fan_in), zero biases."""
        shapes = self.layer_shapes()
        keys = jax.random.split(key, len(shapes))
        theta = {}
        for k, (name, s) in zip(keys, shapes.items()):
            fan_in, width = s["w"]
            w = jax.random.truncated_normal(k, -2.0, 2.0, (fan_in, width), jnp.float32) / np.sqrt(fan_in)
            theta[name] = {"w": w, "b": jnp.zeros((width,), jnp.float32)}
        return theta

    # ----- state
    state_fields = ("m",)

    @property
    def state_type(self):
        return MLPLOptState

    def leaf_state_shapes(self, shape):
        return (tuple(int(d) for d in shape) + (len(MOMENTUM_DECAYS),),)

    # ----- the rule
    def reference_leaves(self, theta, iteration, leaves, context=None):
        """Per leaf (p, g, m) float32 -> (step, new m)."""
        feat = step_features(iteration)
        return [self._leaf_step(theta, feat, p, g, m) for p, g, m in leaves]

    def fused_leaves(self, theta, iteration, leaves, *, write_delta: bool, context=None):
        """One lopt_mlp_update call (CPU only) for all leaves (p, g, m): per leaf (out, m)."""
        attrs = dict(hidden_size=np.int64(self.hidden_size), hidden_layers=np.int64(self.hidden_layers),
                     exp_mult=np.float32(self.exp_mult), step_mult=np.float32(self.step_mult))
        return _ffi.mlp_call(self.pack_theta(theta, iteration), leaves, attrs, write_delta)

    def pack_theta(self, theta, iteration) -> jax.Array:
        """The kernel's per-member float32 buffer (csrc/kernels/lopt_config.h, MlpPackedLayout);
        the step features are folded into the first-layer bias."""
        decays = jnp.asarray(MOMENTUM_DECAYS, jnp.float32)
        first = theta["mlp/~/linear_0"]
        w0 = jnp.asarray(first["w"], jnp.float32)
        b0 = first["b"] + jnp.matmul(step_features(iteration), w0[NUM_NORMALIZED:], precision=_HI)
        parts = [decays, 1 - decays, w0[:NUM_NORMALIZED], b0]
        for i in range(1, self.hidden_layers + 1):
            layer = theta[f"mlp/~/linear_{i}"]
            parts += [layer["w"], layer["b"]]
        packed = jnp.concatenate([jnp.asarray(x, jnp.float32).ravel() for x in parts])
        expected = _ffi.mlp_packed_size(self.hidden_size, self.hidden_layers)
        assert packed.shape == (expected,), (packed.shape, expected)
        return packed

    def _leaf_step(self, theta, feat, p, g, m):
        shape = p.shape
        if p.ndim == 0:
            p, g, m = p[None], g[None], m[None]
        decays = jnp.asarray(MOMENTUM_DECAYS, jnp.float32)
        m = decays * m + (1 - decays) * g[..., None]
        x = jnp.concatenate([g[..., None], p[..., None], m], axis=-1)
        axes = tuple(range(p.ndim))
        x = x * lax.rsqrt(1e-5 + jnp.mean(jnp.square(x), axis=axes, keepdims=True))
        x = jnp.concatenate([x, jnp.broadcast_to(feat, p.shape + feat.shape)], axis=-1)
        for i in range(self.hidden_layers + 1):
            layer = theta[f"mlp/~/linear_{i}"]
            x = jnp.matmul(x, layer["w"], precision=_HI) + layer["b"]
            if i < self.hidden_layers:
                x = jax.nn.relu(x)
        step = x[..., 0] * jnp.exp(x[..., 1] * self.exp_mult) * self.step_mult
        if len(shape) == 0:
            step, m = step[0], m[0]
        return step.reshape(shape), m

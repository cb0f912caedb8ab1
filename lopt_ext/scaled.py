"""small_fc_lopt with a learned per-tensor step scale (``ScaledSmallFcLOpt``).

small_fc_lopt normalises every feature by its RMS over the tensor, so it sees no absolute
scale: its step is ``d * exp(mag * exp_mult) * step_mult`` in absolute units, the same
schedule on every task, and it cannot tell a noisy late phase (where it should take small
steps) from a clean early one. This variant multiplies each tensor's step by

    s = exp(4 tanh(z / 4)),   z = w_lin . u + b + w2 . relu(W1 u + b1)

computed from un-normalised, loss-scale-free statistics u of the tensor (per step):
  - log RMS of the parameter tensor (its scale; zero-initialised biases read as 1e-3),
  - for each momentum decay, log(RMS(m_k) / sqrt(mean(rms))): a signal-to-noise ratio at
    that timescale (near 0 for a steady gradient, about -1.5 ... -3.8 for pure noise),
  - log of the number of elements, and the 11 tanh step features,
all from the NEW accumulators (what the fused kernel's statistics pass sees). Multiplying g
by any constant leaves s unchanged, as it leaves Adam unchanged. w_lin, b and w2 start at
zero, so a fresh theta gives s = 1: exactly small_fc_lopt.

The per-element part runs through the same fused kernel (or the reference); the scale is
a handful of reductions per tensor computed in JAX, applied to the kernel's step.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lopt_ext.config import STEP_TIMESCALES, SmallFcLOpt, step_features

SCALE_BOUND = 4.0  # |log s| <= 4: the scale stays within [0.018, 55]


@dataclasses.dataclass(frozen=True)
class ScaledSmallFcLOpt(SmallFcLOpt):
    """SmallFcLOpt plus a learned per-tensor step scale; ``scale_hidden`` units in its MLP."""

    scale_hidden: int = 8

    def __post_init__(self):
        super().__post_init__()
        value = self.scale_hidden
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= 256:
            raise ValueError(f"ScaledSmallFcLOpt: scale_hidden must be an int in [1, 256], got {value!r}")

    @property
    def num_scale_inputs(self) -> int:
        return 2 + self.num_decays[0] + len(STEP_TIMESCALES)

    def theta_shapes(self):
        shapes = super().theta_shapes()
        n, h = self.num_scale_inputs, self.scale_hidden
        shapes["tensor_scale"] = {"w_lin": (n,), "b": (1,), "w1": (n, h), "b1": (h,), "w2": (h,)}
        return shapes

    def init_theta(self, key):
        k_base, k_scale = jax.random.split(key)
        theta = super().init_theta(k_base)
        n, h = self.num_scale_inputs, self.scale_hidden
        w1 = jax.random.truncated_normal(k_scale, -2.0, 2.0, (n, h), jnp.float32) / np.sqrt(n)
        theta["tensor_scale"] = {"w_lin": jnp.zeros((n,), jnp.float32), "b": jnp.zeros((1,), jnp.float32),
                                 "w1": w1, "b1": jnp.zeros((h,), jnp.float32), "w2": jnp.zeros((h,), jnp.float32)}
        return theta

    def scale_inputs(self, theta, iteration, p, g, m, rms):
        """The per-tensor statistics u (see the module docstring) of one float32 tensor, from
        its old accumulators m, rms and gradient g."""
        mom_b, rms_b, _ = self.decays(theta)
        rms_c = jnp.clip(rms_b, 0.0, 1.0)
        g1 = jnp.reshape(g, (-1, 1))
        m_new = jnp.reshape(m, (-1, m.shape[-1])) * mom_b + (1 - mom_b) * g1
        rms_new = jnp.reshape(rms, (-1, rms.shape[-1])) * rms_c + (1 - rms_c) * g1 * g1
        return self.scale_inputs_new(iteration, p, m_new, rms_new)

    def scale_inputs_new(self, iteration, p, m_new, rms_new):
        """u from the NEW accumulators (what a step returns as its new state)."""
        hi = jax.lax.Precision.HIGHEST
        n = max(int(np.prod(jnp.shape(p))), 1)
        m2 = jnp.reshape(m_new, (-1, m_new.shape[-1]))
        # the mean square of each decay's column: a dot, which XLA:CPU streams (a column
        # reduction of the [n, 3] records was 3x slower than the whole fused step)
        log_rms_m = 0.5 * jnp.log(jnp.einsum("nk,nk->k", m2, m2, precision=hi) / n + 1e-30)
        log_rms_g = 0.5 * jnp.log(jnp.mean(rms_new) + 1e-30)
        snr = jnp.clip(log_rms_m - log_rms_g, -10.0, 3.0)
        p1 = jnp.reshape(p, (-1,))
        log_rms_p = 0.5 * jnp.log(jnp.dot(p1, p1, precision=hi) / n + 1e-6)
        log_size = jnp.log(jnp.float32(n))
        return jnp.concatenate([jnp.reshape(log_rms_p / 3.0, (1,)), snr / 3.0,
                                jnp.reshape(log_size / 10.0, (1,)), step_features(iteration)])

    def tensor_scale(self, theta, iteration, p, g, m, rms):
        """The step multiplier s of one tensor (a float32 scalar), from its old state."""
        return self._scale(theta, self.scale_inputs(theta, iteration, p, g, m, rms))

    def _scale(self, theta, u):
        t = theta["tensor_scale"]
        hi = jax.lax.Precision.HIGHEST
        hidden = jax.nn.relu(jnp.matmul(u, t["w1"], precision=hi) + t["b1"])
        z = jnp.dot(u, t["w_lin"], precision=hi) + t["b"][0] + jnp.dot(hidden, t["w2"], precision=hi)
        return jnp.exp(SCALE_BOUND * jnp.tanh(z / SCALE_BOUND))

    def adam_like_theta(self, key, lr: float = 3e-3):
        """A theta whose rule starts close to Adam (beta1 = the first momentum decay, beta2 = the
        rms decay, no bias correction) with learning rate ``lr``: a starting point for
        meta-training that already trains every task, instead of a random rule.

        The per-element MLP passes the normalised feature m_0 * rsqrt(rms + 1e-6) through two
        ReLU units per layer (relu(x) - relu(-x) = x) to the direction output, so the step is
        step_mult * (m/sqrt(v)) / R with R that feature's RMS over the tensor; the scale's
        linear term on the first SNR input (log RMS(m_0) - log sqrt(mean rms), about log R)
        and its bias log(lr / step_mult) make s ~ lr R / step_mult. The other weights start
        small (random) so that meta-training can use them.
        """
        if self.hidden_size < 2:
            raise ValueError("adam_like_theta needs hidden_size >= 2")
        theta = self.init_theta(key)
        nn = dict(theta["nn"]["~"])
        k = jax.random.split(jax.random.fold_in(key, 1), self.hidden_layers + 1)
        small = lambda kk, shape: 0.01 * jax.random.truncated_normal(kk, -2.0, 2.0, shape, jnp.float32)
        from lopt_ext.config import num_normalized_features
        dm, dr, _ = self.num_decays
        feature = 2 + dm + dr  # m[0] * rsqrt(rms + 1e-6), in the spec's feature order
        w0 = small(k[0], nn["w0"].shape)
        w0 = w0.at[:, :2].set(0.0).at[feature, 0].set(1.0).at[feature, 1].set(-1.0)
        nn["w0"], nn["b0"] = w0, jnp.zeros_like(nn["b0"])
        for i in range(1, self.hidden_layers):
            w = small(k[i], nn[f"w{i}"].shape)
            w = w.at[:, :2].set(0.0).at[:2, :].set(0.0).at[0, 0].set(1.0).at[1, 1].set(1.0)
            nn[f"w{i}"], nn[f"b{i}"] = w, jnp.zeros_like(nn[f"b{i}"])
        last = self.hidden_layers
        w = small(k[last], nn[f"w{last}"].shape)
        w = w.at[:2, :].set(0.0).at[0, 0].set(1.0).at[1, 0].set(-1.0).at[:, 1].set(0.0)
        nn[f"w{last}"], nn[f"b{last}"] = w, jnp.zeros_like(nn[f"b{last}"])
        assert nn["w0"].shape[0] == num_normalized_features(*self.num_decays) + len(STEP_TIMESCALES)
        ts = dict(theta["tensor_scale"])
        ts["w_lin"] = ts["w_lin"].at[1].set(3.0)  # u[1] = snr_0 / 3
        ts["b"] = jnp.asarray([np.log(lr / self.step_mult)], jnp.float32)
        return dict(theta, nn={"~": nn}, tensor_scale=ts)

    has_step_scales = True

    def step_scales(self, theta, iteration, leaves, new_state):
        """Per leaf (p, g, m, rms, ...) with new state (m_new, rms_new, ...) its step's multiplier."""
        return [self._scale(theta, self.scale_inputs_new(iteration, leaf[0], new[0], new[1]))
                for leaf, new in zip(leaves, new_state)]

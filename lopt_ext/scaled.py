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
  - with ``progress_inputs=True``, how far the tensor has come since its first step:
    log(RMS(p_t) / RMS(p_0)) (weights grow as a model memorises a small data set; 0 for
    tensors that start at zero) and
    log(RMS_fast(g_t) / RMS(g_0)) / 3, RMS_fast the bias-corrected fastest Adafactor
    (or rms) accumulator (how far the gradient has fallen); the first-step statistics are
    per-tensor state (``scale_ref``, 2 floats per tensor); they also drive a learned
    weight decay, s * (step + lambda p) with lambda = exp(decay_b + decay_w . progress)
    (off in a fresh theta), which lets the rule hold a regularised solution of a small data
    set that it would otherwise go on to memorise,
  - with ``horizon_inputs=True``, where the run stands in its horizon (``num_steps``, which
    ``transform``/``init_state`` then require, as Celo's do): f = iteration / num_steps
    through tanh(10 (f - c)) for c in HORIZON_FRACTIONS and log(cosine(f) + 1e-3) / 7, with
    cosine(f) = (1 + cos(pi min(f, 1))) / 2, so that a linear weight of 7 on the last input is
    a cosine decay to ~0 at the horizon, and the tanh steps any other learned schedule,
  - with ``loss_inputs`` set, what the loss has done (optax's ``value``, which every step
    then requires; ``loss_inputs`` names the loss the rule was meta-trained on, "train" for
    the step's minibatch loss or "validation" for a validation-batch loss, so that callers
    pass the same): from bias-corrected averages of the loss at two timescales
    (LOSS_DECAYS, fast a and slow b), its first value L_0 and the lowest fast average so far,
    log(b / L_0) / 3 (how far it has fallen), log(a / min a) (how far it has risen above
    its best: overfitting, for a validation loss; instability, for a training loss) and
    log(a / b) (its trend), each clipped; all three are unchanged when the loss is
    multiplied by a constant (the loss is taken as >= 0: a cross-entropy, a squared error);
    with ``loss_inputs="train+validation"`` the step also takes a validation-batch loss
    (``validation_value``) and the scale 2 more inputs (NUM_GAP_INPUTS) from bias-corrected
    averages of it: log(slow validation / slow training average) / 3, the generalisation gap
    (a model memorising a small data set drives it up while its training loss falls), and
    log(fast validation average / its lowest so far), how far the held-out loss has risen
    above its best (the signal of early stopping), each clipped,
all from the NEW accumulators (what the fused kernel's statistics pass sees). Multiplying g
by any constant leaves s unchanged, as it leaves Adam unchanged. w_lin, b and w2 start at
zero, so a fresh theta gives s = 1: exactly small_fc_lopt.

The per-element part runs through the same fused kernel (or the reference); the scale is
a handful of reductions per tensor computed in JAX, applied to the kernel's step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lopt_ext import _ffi
from lopt_ext.common import STEP_TIMESCALES, fraction_steps, num_normalized_features, step_features
from lopt_ext.config import SmallFcLOpt, SmallFcLOptState

SCALE_BOUND = 4.0  # |log s| <= 4: the scale stays within [0.018, 55]
NUM_PROGRESS_INPUTS = 2
HORIZON_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 0.9)
NUM_HORIZON_INPUTS = len(HORIZON_FRACTIONS) + 1
# the losses a rule with loss inputs may be meta-trained on: "train+validation" reads the
# minibatch loss (value) and a validation batch's (validation_value)
LOSS_SOURCES = ("train", "validation", "train+validation")
LOSS_DECAYS = (0.9, 0.99)  # the fast and slow averages of the loss inputs
NUM_LOSS_INPUTS = 3
NUM_GAP_INPUTS = 2  # the validation inputs of loss_inputs="train+validation"
LOSS_FLOOR = 1e-30  # losses (and their averages) are read as at least this before the logs
DECAY_OFF = -30.0  # decay_b at or below this: no weight decay (exactly)
MAX_LOG_DECAY = float(np.log(0.1))  # lambda <= 0.1 per step
ZERO_LOG_RMS = 0.5 * float(np.log(1e-6))  # log RMS(p) of an all-zero tensor (the 1e-6 floor)
# Below this many elements per step (all tensors of one member) XLA's fused reductions cost
# less than a call into the kernel's threaded sums (meta-training's tiny models stay on them).
FUSED_SUMS_MIN_ELEMENTS = 1 << 16


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


def _with_num_steps(base, name: str, doc: str):
    """A state type: ``base``'s fields plus num_steps (int32 scalar: the horizon; 0 = not given,
    each step must pass it)."""
    state = NamedTuple(name, [(f, Any) for f in base._fields] + [("num_steps", jax.Array)])
    state.__doc__ = doc
    return state


ScaledHorizonState = _with_num_steps(SmallFcLOptState, "ScaledHorizonState",
                                     "SmallFcLOptState plus num_steps: ScaledSmallFcLOpt(horizon_inputs=True).")
ScaledProgressHorizonState = _with_num_steps(ScaledSmallFcLOptState, "ScaledProgressHorizonState",
                                             "ScaledSmallFcLOptState plus num_steps: progress and horizon inputs.")

# the global state fields of the loss inputs: the first loss, the fast and slow averages
# (not bias-corrected) and the lowest bias-corrected fast average so far
LOSS_FIELDS = ("loss_first", "loss_means", "loss_min")
# and, with loss_inputs="train+validation", the validation loss's averages and lowest fast one
GAP_FIELDS = ("valid_means", "valid_min")
_LOSS_STATE_TYPES = {}


def _with_loss_fields(base, fields=LOSS_FIELDS):
    """``base``'s fields plus ``fields``: the state of a rule with loss inputs (one class per
    base and fields, made once, so that isinstance checks hold across calls)."""
    if (base, fields) not in _LOSS_STATE_TYPES:
        suffix = "LossGapState" if fields != LOSS_FIELDS else "LossState"
        name = base.__name__.replace("State", "") + suffix
        state = NamedTuple(name, [(f, Any) for f in base._fields] + [(f, jax.Array) for f in fields])
        state.__doc__ = f"{base.__name__} plus {', '.join(fields)}: ScaledSmallFcLOpt(loss_inputs=...)."
        _LOSS_STATE_TYPES[base, fields] = state
    return _LOSS_STATE_TYPES[base, fields]


def horizon_features(iteration, num_steps) -> jax.Array:
    """The NUM_HORIZON_INPUTS scale inputs of step ``iteration`` (before the increment) of a
    run of ``num_steps`` (see the module docstring)."""
    f = jnp.asarray(iteration).astype(jnp.float32) / jnp.maximum(jnp.asarray(num_steps), 1).astype(jnp.float32)
    cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip(f, 0.0, 1.0)))
    steps = fraction_steps(f, HORIZON_FRACTIONS)
    return jnp.concatenate([steps, jnp.reshape(jnp.log(cosine + 1e-3) / 7.0, (1,))])


def loss_features(iteration, value, loss_first, loss_means, loss_min):
    """(the NUM_LOSS_INPUTS scale inputs, new loss_first, loss_means, loss_min) of the step
    ``iteration`` (before the increment) whose loss is ``value`` (see the module docstring)."""
    it = jnp.asarray(iteration)
    loss = jnp.maximum(jnp.asarray(value, jnp.float32), 0.0)
    decays = jnp.asarray(LOSS_DECAYS, jnp.float32)
    means = loss_means * decays + (1.0 - decays) * loss
    corrected = means / (1.0 - decays ** (it + 1).astype(jnp.float32))
    first = jnp.where(it == 0, loss, loss_first)
    lowest = jnp.where(it == 0, corrected[0], jnp.minimum(loss_min, corrected[0]))
    log = lambda x: jnp.log(jnp.maximum(x, LOSS_FLOOR))  # noqa: E731
    fell = jnp.clip(log(corrected[1]) - log(first), -12.0, 3.0) / 3.0
    rose = jnp.clip(log(corrected[0]) - log(lowest), 0.0, 3.0)
    trend = jnp.clip(log(corrected[0]) - log(corrected[1]), -3.0, 3.0)
    return jnp.stack([fell, rose, trend]), first, means, lowest


def gap_features(iteration, validation_value, train_means, valid_means, valid_min):
    """(the NUM_GAP_INPUTS scale inputs, new valid_means, valid_min) of the step ``iteration``
    whose validation-batch loss is ``validation_value``; train_means: the training loss's new
    averages (loss_features'), see the module docstring."""
    it = jnp.asarray(iteration)
    loss = jnp.maximum(jnp.asarray(validation_value, jnp.float32), 0.0)
    decays = jnp.asarray(LOSS_DECAYS, jnp.float32)
    debias = 1.0 - decays ** (it + 1).astype(jnp.float32)
    means = valid_means * decays + (1.0 - decays) * loss
    corrected, train = means / debias, train_means / debias
    lowest = jnp.where(it == 0, corrected[0], jnp.minimum(valid_min, corrected[0]))
    log = lambda x: jnp.log(jnp.maximum(x, LOSS_FLOOR))  # noqa: E731
    gap = jnp.clip(log(corrected[1]) - log(train[1]), -3.0, 6.0) / 3.0
    rose = jnp.clip(log(corrected[0]) - log(lowest), 0.0, 3.0)
    return jnp.stack([gap, rose]), means, lowest


@dataclasses.dataclass(frozen=True)
class ScaledSmallFcLOpt(SmallFcLOpt):
    """SmallFcLOpt plus a learned per-tensor step scale; ``scale_hidden`` units in its MLP."""

    scale_hidden: int = 8
    progress_inputs: bool = False
    horizon_inputs: bool = False
    loss_inputs: Optional[str] = None  # None, or the loss it reads: one of LOSS_SOURCES

    def __post_init__(self):
        super().__post_init__()
        value = self.scale_hidden
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= 256:
            raise ValueError(f"ScaledSmallFcLOpt: scale_hidden must be an int in [1, 256], got {value!r}")
        for name in ("progress_inputs", "horizon_inputs"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"ScaledSmallFcLOpt: {name} must be a bool, got {getattr(self, name)!r}")
        if self.loss_inputs is not None and self.loss_inputs not in LOSS_SOURCES:
            raise ValueError(f"ScaledSmallFcLOpt: loss_inputs must be None or one of {LOSS_SOURCES}, "
                             f"got {self.loss_inputs!r}")

    @property
    def uses_horizon(self) -> bool:
        return bool(self.horizon_inputs)

    @property
    def uses_loss(self) -> bool:
        return self.loss_inputs is not None

    @property
    def loss_source(self) -> str:
        """The loss each step's ``value`` must be: the one the rule was meta-trained on."""
        return "train" if self.loss_inputs in (None, "train+validation") else self.loss_inputs

    @property
    def uses_validation_loss(self) -> bool:
        """Whether every step also needs a validation-batch loss (``validation_value``)."""
        return self.loss_inputs == "train+validation"

    @property
    def num_base_scale_inputs(self) -> int:
        """Scale inputs of every configuration (the progress and horizon inputs follow them)."""
        return 2 + self.num_decays[0] + len(STEP_TIMESCALES)

    @property
    def num_scale_inputs(self) -> int:
        return (self.num_base_scale_inputs + (NUM_PROGRESS_INPUTS if self.progress_inputs else 0)
                + (NUM_HORIZON_INPUTS if self.horizon_inputs else 0) + self.num_loss_inputs)

    @property
    def num_loss_inputs(self) -> int:
        """The loss inputs (the scale's last): the training loss's, then the validation loss's."""
        return (NUM_LOSS_INPUTS if self.uses_loss else 0) + (NUM_GAP_INPUTS if self.uses_validation_loss else 0)

    @property
    def loss_fields(self):
        return (LOSS_FIELDS if self.uses_loss else ()) + (GAP_FIELDS if self.uses_validation_loss else ())

    # ----- state: small_fc_lopt's, plus scale_ref with progress_inputs, num_steps with
    # horizon_inputs, LOSS_FIELDS with loss_inputs
    @property
    def state_fields(self):
        return SmallFcLOpt.state_fields + (("scale_ref",) if self.progress_inputs else ())

    @property
    def global_fields(self):
        return (("num_steps",) if self.horizon_inputs else ()) + self.loss_fields

    @property
    def state_type(self):
        if self.horizon_inputs:
            base = ScaledProgressHorizonState if self.progress_inputs else ScaledHorizonState
        else:
            base = ScaledSmallFcLOptState if self.progress_inputs else SmallFcLOptState
        return _with_loss_fields(base, self.loss_fields) if self.uses_loss else base

    def global_shapes(self):
        shapes = {"num_steps": ((), jnp.int32)} if self.horizon_inputs else {}
        if self.uses_loss:
            shapes.update(loss_first=((), jnp.float32), loss_means=((len(LOSS_DECAYS),), jnp.float32),
                          loss_min=((), jnp.float32))
        if self.uses_validation_loss:
            shapes.update(valid_means=((len(LOSS_DECAYS),), jnp.float32), valid_min=((), jnp.float32))
        return shapes

    def init_globals(self, num_steps):
        out = {}
        if self.horizon_inputs:
            out["num_steps"] = jnp.asarray(0 if num_steps is None else num_steps, jnp.int32)
        if self.uses_loss:  # zeros of global_shapes' loss fields (step_context sets them at step 0)
            out.update({name: jnp.zeros(shape, dtype) for name, (shape, dtype) in self.global_shapes().items()
                        if name in self.loss_fields})
        return out

    def step_context(self, theta, state, value, num_steps, validation_value=None):
        """With horizon or loss inputs: (the scale inputs of this step shared by every tensor,
        the horizon and loss fields of the new state); validation_value: the validation-batch
        loss of a rule with uses_validation_loss."""
        parts, new = [], {}
        if self.horizon_inputs:
            horizon = state.num_steps if num_steps is None else jnp.asarray(num_steps, jnp.int32)
            parts.append(horizon_features(state.iteration, horizon))
            new["num_steps"] = horizon
        if self.uses_loss:
            u, first, means, lowest = loss_features(state.iteration, value, state.loss_first, state.loss_means,
                                                    state.loss_min)
            parts.append(u)
            new.update(loss_first=first, loss_means=means, loss_min=lowest)
        if self.uses_validation_loss:
            if validation_value is None:
                raise ValueError("ScaledSmallFcLOpt(loss_inputs='train+validation'): step_context needs validation_value")
            u, v_means, v_min = gap_features(state.iteration, validation_value, means, state.valid_means,
                                             state.valid_min)
            parts.append(u)
            new.update(valid_means=v_means, valid_min=v_min)
        return (jnp.concatenate(parts) if parts else None), new

    def leaf_state_shapes(self, shape):
        shapes = super().leaf_state_shapes(shape)
        return shapes + (((NUM_PROGRESS_INPUTS,),) if self.progress_inputs else ())

    def reference_leaves(self, theta, iteration, leaves, context=None):
        if not self.progress_inputs:
            return super().reference_leaves(theta, iteration, leaves)
        return self._with_ref(iteration, leaves, super().reference_leaves(theta, iteration, [x[:-1] for x in leaves]))

    def fused_leaves(self, theta, iteration, leaves, *, write_delta: bool, context=None):
        if not self.progress_inputs:
            return super().fused_leaves(theta, iteration, leaves, write_delta=write_delta)
        res = super().fused_leaves(theta, iteration, [x[:-1] for x in leaves], write_delta=write_delta)
        return self._with_ref(iteration, leaves, res)

    def _with_ref(self, iteration, leaves, results):
        """Appends each leaf's new scale_ref: its first step's statistics, kept afterwards."""
        out = []
        for leaf, res in zip(leaves, results):
            p, g, ref = leaf[0], leaf[1], leaf[-1]
            first = jnp.stack([_log_rms(p, 1e-6), _log_rms(g, 1e-30)])
            out.append((*res, jnp.where(iteration == 0, first, ref)))
        return out

    def theta_shapes(self):
        shapes = super().theta_shapes()
        n, h = self.num_scale_inputs, self.scale_hidden
        shapes["tensor_scale"] = {"w_lin": (n,), "b": (1,), "w1": (n, h), "b1": (h,), "w2": (h,)}
        if self.progress_inputs:
            shapes["tensor_scale"].update(decay_w=(NUM_PROGRESS_INPUTS,), decay_b=(1,))
        return shapes

    def init_theta(self, key):
        k_base, k_scale = jax.random.split(key)
        theta = super().init_theta(k_base)
        n, h = self.num_scale_inputs, self.scale_hidden
        w1 = jax.random.truncated_normal(k_scale, -2.0, 2.0, (n, h), jnp.float32) / np.sqrt(n)
        theta["tensor_scale"] = {"w_lin": jnp.zeros((n,), jnp.float32), "b": jnp.zeros((1,), jnp.float32),
                                 "w1": w1, "b1": jnp.zeros((h,), jnp.float32), "w2": jnp.zeros((h,), jnp.float32)}
        if self.progress_inputs:
            theta["tensor_scale"].update(_decay_off())
        return theta

    def scale_inputs(self, theta, iteration, p, g, m, rms):
        """The per-tensor statistics u (see the module docstring) of one float32 tensor, from
        its old accumulators m, rms and gradient g."""
        mom_b, rms_b, _ = self.decays(theta)
        rms_c = jnp.clip(rms_b, 0.0, 1.0)
        g1 = jnp.reshape(g, (-1, 1))
        m_new = jnp.reshape(m, (-1, m.shape[-1])) * mom_b + (1 - mom_b) * g1
        rms_new = jnp.reshape(rms, (-1, rms.shape[-1])) * rms_c + (1 - rms_c) * g1 * g1
        return self.scale_inputs_from_sums(iteration, self.scale_sums(p, m_new, rms_new), _numel(p))

    def scale_sums_leaves(self, items, impl: str = "reference"):
        """scale_sums of every (p, m_new, rms_new) in items. impl="fused" with at least
        FUSED_SUMS_MIN_ELEMENTS elements in all: the CPU kernel's threaded pass (XLA:CPU reduces
        on one thread, ~9 GB/s: a third of the default step at 10M parameters); else XLA's."""
        total = sum(int(np.prod(jnp.shape(p))) for p, _, _ in items)
        if impl != "fused" or total < FUSED_SUMS_MIN_ELEMENTS:
            return [self.scale_sums(*it) for it in items]
        return _ffi.scale_sums(items, self.num_decays[0], self.num_decays[1], self.scale_sums)

    def scale_sums(self, p, m_new, rms_new):
        """The sums over a tensor (or over the local shard of one: the sharded path adds them
        up over devices) that its scale inputs need: [sum p^2, sum m_k^2 for each momentum
        decay k, sum rms]."""
        hi = jax.lax.Precision.HIGHEST
        m2 = jnp.reshape(m_new, (-1, m_new.shape[-1]))
        p1 = jnp.reshape(p, (-1,))
        # the sum of squares of each decay's column: a dot, which XLA:CPU streams (a column
        # reduction of the [n, 3] records was 3x slower than the whole fused step)
        return jnp.concatenate([jnp.reshape(jnp.dot(p1, p1, precision=hi), (1,)),
                                jnp.einsum("nk,nk->k", m2, m2, precision=hi),
                                jnp.reshape(jnp.sum(rms_new), (1,))])

    def scale_inputs_from_sums(self, iteration, sums, n):
        """u (without the progress inputs) of a tensor of n elements from its scale_sums."""
        dm = self.num_decays[0]
        log_rms_p = 0.5 * jnp.log(sums[0] / n + 1e-6)
        log_rms_m = 0.5 * jnp.log(sums[1:1 + dm] / n + 1e-30)
        log_rms_g = 0.5 * jnp.log(sums[1 + dm] / n + 1e-30)
        snr = jnp.clip(log_rms_m - log_rms_g, -10.0, 3.0)
        log_size = jnp.log(jnp.float32(n))
        return jnp.concatenate([jnp.reshape(log_rms_p / 3.0, (1,)), snr / 3.0,
                                jnp.reshape(log_size / 10.0, (1,)), step_features(iteration)])

    @property
    def has_context_inputs(self) -> bool:
        """Whether the scale has inputs beyond one tensor's statistics (progress, horizon, loss)."""
        return bool(self.progress_inputs or self.horizon_inputs or self.uses_loss)

    def scale_from_sums(self, theta, iteration, sums, n):
        """The step multiplier of a tensor of n elements from its scale_sums (no progress inputs)."""
        if self.has_context_inputs:
            raise ValueError("scale_from_sums does not take the progress, horizon or loss inputs: use step_scales")
        return self._scale(theta, self.scale_inputs_from_sums(iteration, sums, n))

    def progress_inputs_new(self, theta, iteration, p, new):
        """The 2 progress inputs of one tensor from its new state fields ``new``."""
        _, rms_b, fac_b = self.decays(theta)
        v_row, v_full, ref = new[2], new[4], new[-1]
        if self.has_adafactor:  # the fastest Adafactor accumulator: the mean of g^2 over ~10 steps
            v, beta = (v_row if v_row.size else v_full), fac_b[0]
        else:
            v, beta = new[1], rms_b[0]
        v0 = jnp.reshape(v, (-1, v.shape[-1]))[:, 0]
        beta = jnp.clip(beta, 0.0, 1.0)
        count = (jnp.asarray(iteration) + 1).astype(jnp.float32)
        debias = jnp.maximum(1.0 - jnp.power(beta, count), 1e-6)
        # scale_ref holds log of mean g_0^2 + 1e-30; the Adafactor accumulators already average
        # g^2 + 1e-30, the rms accumulator g^2
        eps = 0.0 if self.has_adafactor else 1e-30
        log_rms_fast = 0.5 * jnp.log(jnp.mean(v0) / debias + eps)
        # a tensor that starts at zero (a bias) has no scale to grow from: it reads 0
        grew = jnp.where(ref[0] > ZERO_LOG_RMS + 0.01, jnp.clip(_log_rms(p, 1e-6) - ref[0], -5.0, 5.0), 0.0)
        fell = jnp.clip(log_rms_fast - ref[1], -12.0, 3.0)
        return jnp.stack([grew, fell / 3.0])

    def tensor_scale(self, theta, iteration, p, g, m, rms):
        """The step multiplier s of one tensor (a float32 scalar), from its old state (no
        progress inputs: see step_scales)."""
        if self.has_context_inputs:
            raise ValueError("tensor_scale does not take the progress, horizon or loss inputs: use step_scales")
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

    def step_scales(self, theta, iteration, leaves, new_state, impl: str = "reference", context=None):
        """Per leaf (p, g, m, rms, ...) with new state (m_new, rms_new, ...) its step's multiplier;
        impl: how the tensor-wide sums are computed (scale_sums_leaves); context: step_context's
        (the horizon and loss inputs, the same for every tensor)."""
        shared = self.horizon_inputs or self.uses_loss
        if shared and context is None:
            raise ValueError("ScaledSmallFcLOpt with horizon or loss inputs: step_scales needs step_context's context")
        out = []
        sums = self.scale_sums_leaves([(leaf[0], new[0], new[1]) for leaf, new in zip(leaves, new_state)], impl)
        for leaf, new, su in zip(leaves, new_state, sums):
            u = self.scale_inputs_from_sums(iteration, su, _numel(leaf[0]))
            if self.progress_inputs:
                u = jnp.concatenate([u, self.progress_inputs_new(theta, iteration, leaf[0], new)])
            if shared:
                u = jnp.concatenate([u, context])
            out.append(self._scale(theta, u))
        return out

    def step_decays(self, theta, iteration, leaves, new_state, scales):
        """With progress_inputs: per tensor s * lambda, lambda = exp(decay_b + decay_w . progress
        inputs) at most 0.1, s the tensor's step scale (the decay anneals with the step, as
        AdamW's does with its learning rate: a decay that did not would pull the weights to 0
        once the rule anneals). decay_b <= DECAY_OFF turns it off (0, the fresh theta's)."""
        if not self.progress_inputs:
            return None
        t = theta["tensor_scale"]
        hi = jax.lax.Precision.HIGHEST
        out = []
        for leaf, new, scale in zip(leaves, new_state, scales):
            z = jnp.dot(self.progress_inputs_new(theta, iteration, leaf[0], new), t["decay_w"], precision=hi)
            z = jnp.minimum(z + t["decay_b"][0], MAX_LOG_DECAY)
            out.append(jnp.where(t["decay_b"][0] <= DECAY_OFF, 0.0, scale * jnp.exp(z)))
        return out


def _numel(x) -> int:
    """Elements of x, at least 1 (the divisor of a tensor's mean; a scalar counts as 1)."""
    return max(int(np.prod(jnp.shape(x))), 1)


def _log_rms(x, eps):
    x1 = jnp.reshape(x, (-1,))
    n = _numel(x1)
    return 0.5 * jnp.log(jnp.dot(x1, x1, precision=jax.lax.Precision.HIGHEST) / n + eps)


def _decay_off():
    return {"decay_w": jnp.zeros((NUM_PROGRESS_INPUTS,), jnp.float32),
            "decay_b": jnp.full((1,), DECAY_OFF, jnp.float32)}


def with_progress_inputs(lopt: ScaledSmallFcLOpt, theta):
    """(lopt with progress_inputs=True, theta extended with zero weights on the new inputs):
    the same rule, step for step, that a search can then teach to use them."""
    if lopt.progress_inputs:
        return lopt, theta
    ts = _with_zero_inputs(theta["tensor_scale"], lopt.num_base_scale_inputs, NUM_PROGRESS_INPUTS)
    ts.update(_decay_off())
    return dataclasses.replace(lopt, progress_inputs=True), dict(theta, tensor_scale=ts)


def with_horizon_inputs(lopt: ScaledSmallFcLOpt, theta):
    """(lopt with horizon_inputs=True, theta extended with zero weights on the horizon inputs):
    the same rule, step for step, whatever the horizon; a search can then learn a schedule."""
    if lopt.horizon_inputs:
        return lopt, theta
    at = lopt.num_scale_inputs - lopt.num_loss_inputs  # the loss inputs come last
    ts = _with_zero_inputs(theta["tensor_scale"], at, NUM_HORIZON_INPUTS)
    return dataclasses.replace(lopt, horizon_inputs=True), dict(theta, tensor_scale=ts)


def with_loss_inputs(lopt: ScaledSmallFcLOpt, theta, source: str = "train"):
    """(lopt reading the loss ``source`` (LOSS_SOURCES), theta extended with zero weights on the
    loss inputs): the same rule, step for step, whatever the loss; a search can then teach it
    to use them. A rule reading the training loss extends to "train+validation" (the gap
    inputs appended, its training-loss weights kept)."""
    if lopt.loss_inputs == source:
        return lopt, theta
    if lopt.uses_loss and not (lopt.loss_inputs == "train" and source == "train+validation"):
        raise ValueError(f"{lopt} already reads the {lopt.loss_inputs} loss, not the {source} loss")
    rule = dataclasses.replace(lopt, loss_inputs=source)  # validates source
    ts = _with_zero_inputs(theta["tensor_scale"], lopt.num_scale_inputs, rule.num_scale_inputs - lopt.num_scale_inputs)
    return rule, dict(theta, tensor_scale=ts)


def _with_zero_inputs(ts, at: int, k: int):
    """The scale's weights with k inputs of weight 0 inserted before input ``at``."""
    ts = dict(ts)
    w_lin, w1 = jnp.asarray(ts["w_lin"], jnp.float32), jnp.asarray(ts["w1"], jnp.float32)
    ts["w_lin"] = jnp.concatenate([w_lin[:at], jnp.zeros((k,), jnp.float32), w_lin[at:]])
    ts["w1"] = jnp.concatenate([w1[:at], jnp.zeros((k, w1.shape[1]), jnp.float32), w1[at:]])
    return ts

"""Celo (Moudgil et al., "Celo: Training Versatile Learned Optimizers on a Compute Diet"): a
per-parameter MLP whose step a per-tensor LSTM scheduler scales, from how far training has come
and how the loss moves.

The published configuration ("celo" in Celo's factory: meta-testing, phase 2), exactly:
- gradients clipped to [-1000, 1000]; the accumulators of small_fc_lopt (3 momenta, 1 rms,
  3 Adafactor-style factored ones) with their initial decays fixed (Celo learns no decays);
- per element the 30 features g, clip(g, +-0.1), p, m[3], rms, m * rsqrt(rms + 1e-6)[3],
  rsqrt(rms + 1e-6), fac_g[3], g * rsqrt(rms + 1e-6), then the factored row/column features as
  small_fc_lopt's (rank <= 1: v, v, rsqrt(v + 1e-8) twice, m * v^-0.5), each divided by its
  root mean square over the tensor; no step-count features;
- an MLP 30 -> 4 -> 4 -> 3 (ReLU), direction = out[0], magnitude = out[1] (out[2] unused);
  step = direction * exp(magnitude * 1e-3) * 1e-3 * sqrt(mean(p^2) + 1e-9) * lr_mult;
- lr_mult = 0.1 * exp(linear(h)) per tensor, h the output of a 64-unit LSTM fed, per tensor,
  18 inputs: tanh(10 (iteration / num_steps - t)) for 9 fractions t, and 9 features of 10 loss
  averages whose half-lives span 10 steps to num_steps (so the horizon and the loss are inputs).

impl="reference" runs the rule below in pure JAX; impl="fused" runs the per-element part
through the fused CPU kernel (lopt_fused_update in its Celo mode: the two extra features, the
gradient clip, the in-kernel sqrt(mean(p^2)) scale and lr_mult per tensor). The LSTM and the
loss buffer are a few hundred floats per step and stay in JAX.

theta is Celo's own layout ({"ff_mod_stack", "lstm_init_state", "rnn_params"}, with its
param_inits = 1 leading axis): a theta.state file of Celo's drops in (load_theta_state).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lopt_ext import _ffi
from lopt_ext.base import LearnedOptimizer
from lopt_ext.common import accumulator_shapes, check_decay_fields, fraction_steps, leaf_features
from lopt_ext.update import check_theta, check_theta_finite

_HI = lax.Precision.HIGHEST
GRAD_CLIP = 1000.0
FRACTION_TIMESCALES = (0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1)
NUM_LOSS_DECAYS = 10
NUM_LSTM_INPUTS = len(FRACTION_TIMESCALES) + NUM_LOSS_DECAYS - 1  # 18
LOSS_MIN_INIT = 999999999999.0
LR_MULT_SCALE = 0.1
# Celo's 14 first-layer input groups (w0__0 ... w0__13) in the kernel's feature order
# (csrc/kernels/lopt_config.h FeatureIndex): g, p, m, rms, m*rsqrt, rsqrt, fac_g, row v, col v,
# row rsqrt, col rsqrt, fac_m, then Celo's clip(g, 0.1) and g*rsqrt(rms).
KERNEL_GROUP_ORDER = (0, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 1, 8)


class CeloState(NamedTuple):
    """iteration / skipped: int32 scalars. Per-leaf trees (like params): m S + [Dm], rms S + [Dr],
    v_row / v_col / v_full as SmallFcLOptState's, lstm_hidden / lstm_cell [lstm_hidden_size]
    (zero until the first step, which starts from theta's lstm_init_state). Global: num_steps
    (int32, the horizon; 0: not given, each step must pass it), loss_means / loss_min [10] (the
    loss buffer)."""

    iteration: jax.Array
    skipped: jax.Array
    m: Any
    rms: Any
    v_row: Any
    v_col: Any
    v_full: Any
    lstm_hidden: Any
    lstm_cell: Any
    num_steps: jax.Array
    loss_means: jax.Array
    loss_min: jax.Array


def _num_ff_inputs(dm: int, dr: int, da: int) -> Tuple[int, ...]:
    """Widths of Celo's 14 per-element input groups, in its order (w0__0 ... w0__13)."""
    return (1, 1, 1, dm, dr, dm, dr, da, dr, da, da, da, da, da)


@dataclasses.dataclass(frozen=True)
class Celo(LearnedOptimizer):
    """Celo's published configuration, with its keyword names."""

    lstm_hidden_size: int = 64
    ff_hidden_size: int = 4
    ff_hidden_layers: int = 2
    initial_momentum_decays: Tuple[float, ...] = (0.9, 0.99, 0.999)
    initial_rms_decays: Tuple[float, ...] = (0.999,)
    initial_adafactor_decays: Tuple[float, ...] = (0.9, 0.99, 0.999)
    exp_mult: float = 0.001
    step_mult: float = 0.001

    uses_loss = True
    uses_horizon = True
    has_adafactor = True  # the factored accumulators of small_fc_lopt, always

    def __post_init__(self):
        check_decay_fields(self)
        dm, dr, da = self.num_decays
        if da != dm or dr not in (1, dm):
            raise ValueError("Celo: initial_adafactor_decays must have as many values as initial_momentum_decays, "
                             f"and initial_rms_decays 1 or that many; got {dm}, {dr}, {da}")
        self._check_mlp_fields()
        value = self.lstm_hidden_size
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= 1024:
            raise ValueError(f"Celo: lstm_hidden_size must be an int in [1, 1024], got {value!r}")

    # the shared per-parameter MLP checks (LearnedOptimizer._check_mlp_fields) read these names
    @property
    def hidden_size(self) -> int:
        return self.ff_hidden_size

    @property
    def hidden_layers(self) -> int:
        return self.ff_hidden_layers

    @property
    def num_decays(self) -> Tuple[int, int, int]:
        return (len(self.initial_momentum_decays), len(self.initial_rms_decays),
                len(self.initial_adafactor_decays))

    @property
    def num_inputs(self) -> int:
        return sum(_num_ff_inputs(*self.num_decays))

    def decays(self):
        """(momentum, rms, adafactor) decays, float32 (fixed in Celo)."""
        return tuple(jnp.asarray(d, jnp.float32) for d in
                     (self.initial_momentum_decays, self.initial_rms_decays, self.initial_adafactor_decays))

    # ----- theta (Celo's layout)
    def theta_shapes(self):
        H, L, nh = self.ff_hidden_size, self.ff_hidden_layers, self.lstm_hidden_size
        ff = {f"w0__{i}": (1, w, H) for i, w in enumerate(_num_ff_inputs(*self.num_decays))}
        widths = [H] * L + [3]
        for i, width in enumerate(widths):
            if i:
                ff[f"w{i}"] = (1, widths[i - 1], width)
            ff[f"b{i}"] = (1, width)
        linear = lambda n_in, n_out: {"w": (n_in, n_out), "b": (n_out,)}  # noqa: E731
        rnn = {"linear": linear(NUM_LSTM_INPUTS, nh), "linear_1": linear(NUM_LSTM_INPUTS, nh),
               "linear_2": linear(NUM_LSTM_INPUTS, nh), "rnn/linear": linear(2 * nh, 4 * nh),
               "rnn_to_controls": linear(nh, 1), "step_size": linear(nh, 1)}
        return {"ff_mod_stack": {"~": ff}, "lstm_init_state": {"hidden": (1, nh), "cell": (1, nh)},
                "rnn_params": rnn}

    def init_theta(self, key):
        """A fresh theta in Celo's layout, with haiku's initialisers: weights truncated normal
        (2 stddev) of stddev 1/sqrt(fan_in) (for the first layer, the fan-in of all its inputs),
        zero biases and a zero initial LSTM state. Random: not a useful optimizer until trained."""
        shapes = self.theta_shapes()
        keys = iter(jax.random.split(key, 64))

        def weight(shape, fan_in):
            return jax.random.truncated_normal(next(keys), -2.0, 2.0, shape, jnp.float32) / np.sqrt(fan_in)

        ff = {name: (weight(shape, self.num_inputs if name.startswith("w0__") else shape[-2])
                     if name.startswith("w") else jnp.zeros(shape, jnp.float32))
              for name, shape in shapes["ff_mod_stack"]["~"].items()}
        rnn = {name: {"w": weight(s["w"], s["w"][0]), "b": jnp.zeros(s["b"], jnp.float32)}
               for name, s in shapes["rnn_params"].items()}
        init = {name: jnp.zeros(shape, jnp.float32) for name, shape in shapes["lstm_init_state"].items()}
        return {"ff_mod_stack": {"~": ff}, "lstm_init_state": init, "rnn_params": rnn}

    # ----- state
    state_fields = ("m", "rms", "v_row", "v_col", "v_full", "lstm_hidden", "lstm_cell")
    global_fields = ("num_steps", "loss_means", "loss_min")

    @property
    def state_type(self):
        return CeloState

    def leaf_state_shapes(self, shape):
        nh = (self.lstm_hidden_size,)
        return accumulator_shapes(shape, *self.num_decays) + (nh, nh)

    def global_shapes(self):
        return {"num_steps": ((), jnp.int32), "loss_means": ((NUM_LOSS_DECAYS,), jnp.float32),
                "loss_min": ((NUM_LOSS_DECAYS,), jnp.float32)}

    def init_globals(self, num_steps):
        return {"num_steps": jnp.asarray(0 if num_steps is None else num_steps, jnp.int32),
                "loss_means": jnp.zeros((NUM_LOSS_DECAYS,), jnp.float32),
                "loss_min": jnp.full((NUM_LOSS_DECAYS,), LOSS_MIN_INIT, jnp.float32)}

    # ----- the per-step context: loss buffer and LSTM inputs (shared by both impls)
    def step_context(self, theta, state, value, num_steps):
        """(LSTM inputs [18], new global fields) of one step."""
        horizon = state.num_steps if num_steps is None else jnp.asarray(num_steps, jnp.int32)
        decays = loss_decays(horizon)
        it = state.iteration
        loss = jnp.asarray(value, jnp.float32)
        # update the loss buffer: clip the loss at twice the largest corrected average
        cor = state.loss_means / (1 - decays ** (it + 1))
        approx_max = jnp.where(it == 0, loss, jnp.max(cor))
        loss = jnp.minimum(jnp.abs(approx_max) * 2, loss)
        means = state.loss_means * decays + loss * (1.0 - decays)
        cor = means / (1 - decays ** (it + 1))  # also the features' averages (count it + 1)
        loss_min = jnp.minimum(state.loss_min, cor)
        den = jnp.maximum(1e-8, cor[1:] - loss_min[:-1])
        feat = jnp.clip((cor[:-1] - loss_min[:-1]) / den - 1.0, -1, 1)
        loss_feat = jnp.where(it + 1 <= 2, feat * 0, feat)
        fraction = it / horizon.astype(jnp.float32)
        fraction_feat = fraction_steps(fraction, FRACTION_TIMESCALES)
        context = jnp.concatenate([fraction_feat, loss_feat])  # sorted keys: fraction_left, loss_features
        return context, {"num_steps": horizon, "loss_means": means, "loss_min": loss_min}

    def lstm(self, theta, context, hidden, cell):
        """The scheduler over all tensors at once: (lr_mult [n], hidden, cell [n, nh])."""
        rnn = theta["rnn_params"]
        lin = lambda name, x: jnp.matmul(x, rnn[name]["w"], precision=_HI) + rnn[name]["b"]  # noqa: E731
        x = jnp.broadcast_to(context, (hidden.shape[0], context.shape[0]))
        # Celo's mix layer: the first linear's output is discarded (its weights stay in theta)
        v = jnp.max(jax.nn.relu(lin("linear_1", x)), axis=0, keepdims=True)
        x = lin("linear_2", x) + v
        gates = lin("rnn/linear", jnp.concatenate([x, hidden], axis=-1))
        i, g, f, o = jnp.split(gates, 4, axis=-1)
        cell = jax.nn.sigmoid(f + 1) * cell + jax.nn.sigmoid(i) * jnp.tanh(g)
        hidden = jax.nn.sigmoid(o) * jnp.tanh(cell)
        lr_mult = jnp.exp(lin("step_size", hidden)[:, 0]) * LR_MULT_SCALE
        return lr_mult, hidden, cell

    def _scheduled(self, theta, iteration, leaves, context):
        # Celo starts every tensor's LSTM at theta's lstm_init_state; here the state's LSTM
        # fields start at zero and the first step reads theta's (init_state needs no theta).
        first = iteration == 0
        init = theta["lstm_init_state"]
        hidden = jnp.stack([jnp.where(first, init["hidden"][0], leaf[7]) for leaf in leaves])
        cell = jnp.stack([jnp.where(first, init["cell"][0], leaf[8]) for leaf in leaves])
        return self.lstm(theta, context, hidden, cell)

    def reference_leaves(self, theta, iteration, leaves, context=None):
        """Per leaf (p, g, m, rms, v_row, v_col, v_full, lstm_hidden, lstm_cell) -> (step, new state)."""
        lr_mult, hidden, cell = self._scheduled(theta, iteration, leaves, context)
        ff = jax.tree_util.tree_map(lambda x: x[0], theta["ff_mod_stack"]["~"])
        decays = self.decays()
        return [(*_leaf_step(self, decays, ff, lr_mult[i], *leaf[:7]), hidden[i], cell[i])
                for i, leaf in enumerate(leaves)]

    def fused_leaves(self, theta, iteration, leaves, *, write_delta: bool, context=None):
        """The per-element rule through one lopt_celo_update call for all leaves (CPU, and CUDA
        where its module is built), each tensor's step times the scheduler's lr_mult."""
        lr_mult, hidden, cell = self._scheduled(theta, iteration, leaves, context)
        dm, dr, da = self.num_decays
        attrs = dict(hidden_size=np.int64(self.ff_hidden_size), hidden_layers=np.int64(self.ff_hidden_layers),
                     dm=np.int64(dm), dr=np.int64(dr), da=np.int64(da), exp_mult=np.float32(self.exp_mult),
                     step_mult=np.float32(self.step_mult))
        head = [self.pack_theta(theta), jnp.asarray(lr_mult, jnp.float32)]
        res = _ffi.accumulator_call(_ffi.CELO_UPDATE, head, [leaf[:7] for leaf in leaves], True, write_delta, attrs)
        return [(*r, hidden[i], cell[i]) for i, r in enumerate(res)]

    def pack_theta(self, theta) -> jax.Array:
        """The kernel's per-member float32 buffer in small_fc_lopt's layout (PackedLayout with
        celo): the fixed decays, the first-layer rows reordered, the output layer's unused third
        column dropped."""
        mom_b, rms_b, fac_b = self.decays()
        rms_c, fac_c = jnp.clip(rms_b, 0.0, 1.0), jnp.clip(fac_b, 0.0, 1.0)
        ff = theta["ff_mod_stack"]["~"]
        w0 = jnp.concatenate([ff[f"w0__{i}"][0] for i in KERNEL_GROUP_ORDER], axis=0)
        parts = [mom_b, 1 - mom_b, rms_c, 1 - rms_c, fac_c, 1 - fac_c, w0, ff["b0"][0]]
        for i in range(1, self.ff_hidden_layers):
            parts += [ff[f"w{i}"][0], ff[f"b{i}"][0]]
        last = self.ff_hidden_layers
        parts += [ff[f"w{last}"][0][:, :2], ff[f"b{last}"][0][:2]]
        packed = jnp.concatenate([jnp.asarray(x, jnp.float32).ravel() for x in parts])
        expected = _ffi.packed_size(self.ff_hidden_size, self.ff_hidden_layers, *self.num_decays, celo=True)
        assert packed.shape == (expected,), (packed.shape, expected)
        return packed


def loss_decays(num_steps) -> jax.Array:
    """The 10 loss-average decays exp(-1 / halflife), half-lives log-spaced from 10 to num_steps."""
    halflife = jnp.logspace(1, jnp.log10(jnp.asarray(num_steps, jnp.float32)), NUM_LOSS_DECAYS)
    return jnp.exp(-1.0 / halflife)


def celo_features(lopt: Celo, decays, p, g, m, rms, v_row, v_col, v_full):
    """Accumulator updates and Celo's 30 un-normalised features of one tensor of rank >= 1
    (g already clipped): (groups in Celo's order, m, rms, v_row, v_col, v_full). The
    accumulators and 28 of the features are small_fc_lopt's (common.leaf_features)."""
    x, m, rms, v_row, v_col, v_full, _, _ = leaf_features(lopt, decays, p, g, m, rms, v_row, v_col, v_full)
    dm, dr, da = lopt.num_decays
    widths = (1, 1, dm, dr, dm, dr, da, da, da, da, da, da)
    g1, p1, m1, rms1, m_rs, rs, fac_g, row, col, row_rs, col_rs, fac_m = jnp.split(
        x, np.cumsum(widths)[:-1].tolist(), axis=-1)
    if p.ndim < 2:  # Celo's m * v^-0.5 has no epsilon (small_fc_lopt's spec adds 1e-6)
        fac_m = m * v_full ** -0.5
    groups = [g1, jnp.clip(g1, -0.1, 0.1), p1, m1, rms1, m_rs, rs, fac_g, g1 * rs,
              row, col, row_rs, col_rs, fac_m]
    return groups, m, rms, v_row, v_col, v_full


def _leaf_step(lopt: Celo, decays, ff, lr_mult, p, g, m, rms, v_row, v_col, v_full):
    """One tensor: (step, m, rms, v_row, v_col, v_full); p_new = p - step."""
    shape = p.shape
    if p.ndim == 0:  # a scalar is treated as shape [1]
        p, g, m, rms, v_full = p[None], g[None], m[None], rms[None], v_full[None]
    g = jnp.clip(g, -GRAD_CLIP, GRAD_CLIP)
    groups, m, rms, v_row, v_col, v_full = celo_features(lopt, decays, p, g, m, rms, v_row, v_col, v_full)
    axes = tuple(range(p.ndim))
    x = sum(jnp.matmul(f * lax.rsqrt(1e-5 + jnp.mean(jnp.square(f), axis=axes, keepdims=True)),
                       ff[f"w0__{i}"], precision=_HI) for i, f in enumerate(groups)) + ff["b0"]
    for i in range(1, lopt.ff_hidden_layers + 1):
        x = jnp.matmul(jax.nn.relu(x), ff[f"w{i}"], precision=_HI) + ff[f"b{i}"]
    param_scale = jnp.sqrt(jnp.mean(jnp.square(p)) + 1e-9)
    step = x[..., 0] * (param_scale * jnp.exp(x[..., 1] * lopt.exp_mult)) * lopt.step_mult * lr_mult
    if len(shape) == 0:
        step, m, rms, v_full = step[0], m[0], rms[0], v_full[0]
    return step.reshape(shape), m, rms, v_row, v_col, v_full


def load_theta_state(path: str):
    """(Celo(), theta) from a Celo theta.state file (flax msgpack). Raises ValueError naming the
    file when it is not one: unreadable, truncated, or a layout other than the published Celo's."""
    import msgpack

    def ext_hook(code, data):
        if code != 1:  # flax's ndarray extension
            raise ValueError(f"unknown msgpack extension type {code}")
        shape, dtype, buf = msgpack.unpackb(data)
        arr = np.frombuffer(buf, dtype=np.dtype(dtype))
        return arr.reshape(shape)

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise FileNotFoundError(f"cannot read the Celo theta file {path!r}: {e.strerror}") from None
    try:
        tree = msgpack.unpackb(raw, ext_hook=ext_hook, strict_map_key=False)
    except Exception as e:  # truncated or not msgpack at all
        raise ValueError(f"{path!r} is not a Celo theta.state (flax msgpack) file: {type(e).__name__}: {e}") from None
    lopt = Celo()
    if not isinstance(tree, dict):
        raise ValueError(f"{path!r} is not a Celo theta.state file: it holds a {type(tree).__name__}, not a dict")
    theta = jax.tree_util.tree_map(lambda x: jnp.asarray(np.array(x, np.float32)), tree)
    try:
        check_theta(lopt, theta)
        check_theta_finite(theta)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path!r} does not hold the published Celo's theta: {e}") from None
    return lopt, theta

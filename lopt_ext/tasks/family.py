"""The offline task family and its documented train / test split.

Every task is built from data the machine already has (see ``data.py``) or generates itself.

Meta-training split (``TRAIN_SPECS``)            Held-out split (``TEST_SPECS``)
- MLP on digits: widths 16/32/64, depth 1-2,     - MLP on digits with unseen shapes:
  relu/tanh, batch 32-128, init scale 0.5-2        (48,) relu b64, (24,24) tanh b96, (64,32) relu b48
- convnet on digits, channels (4, 8)             - convnet on digits, channels (8, 16)
- char RNN LM (width 32, seq 16)                 - char RNN LM (width 48, seq 24)
- noisy quadratic d=32, seeds 0-2                - noisy quadratic d=32, seeds 100-101
- logistic regression d=16, seeds 0-2            - logistic regression d=16, seeds 100-101

The splits share no (architecture, hyper-parameter, seed) combination: held-out MLP/conv/RNN
tasks use shapes never seen in meta-training, and the synthetic problems use disjoint seeds.
Out of the family (``OUT_OF_FAMILY_SPECS``): a 1-layer causal transformer character LM (attention
never appears in meta-training) and an MLP on scikit-learn's breast-cancer table (another dataset).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from lopt_ext.tasks import data as _data
from lopt_ext.tasks.base import Task, softmax_xent

_ACTS = {"relu": jax.nn.relu, "tanh": jnp.tanh, "gelu": jax.nn.gelu}


@dataclasses.dataclass(frozen=True)
class MLPSpec:
    """An MLP classifier on a bundled data set, or an MLP regressor on a teacher network.

    dataset: "digits", "breast_cancer", "wine" (softmax cross-entropy) or "teacher" (mean
    squared error against a fixed random tanh network of ``teacher_dim`` Gaussian inputs,
    seed ``data_seed``; every batch is a fresh sample). input_noise: stddev of Gaussian noise
    added to every training input (a data augmentation; held-out inputs stay clean).
    """
    hidden: Tuple[int, ...] = (32,)
    activation: str = "relu"
    batch_size: int = 64
    init_scale: float = 1.0
    dataset: str = "digits"
    input_noise: float = 0.0
    data_seed: int = 0
    teacher_dim: int = 16


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    channels: Tuple[int, ...] = (4, 8)
    batch_size: int = 32
    activation: str = "relu"


@dataclasses.dataclass(frozen=True)
class CharLMSpec:
    arch: str = "rnn"          # "rnn" (tanh Elman RNN) or "transformer" (1 causal attention block)
    width: int = 32
    seq_len: int = 16
    batch_size: int = 16


@dataclasses.dataclass(frozen=True)
class QuadraticSpec:
    dim: int = 32
    log_cond: float = 2.0      # curvatures log-uniform in [1, 10**log_cond]
    noise: float = 0.1         # stddev of the gradient noise added per batch
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class LogRegSpec:
    dim: int = 16
    num_train: int = 512
    batch_size: int = 32
    seed: int = 0


# The MLP family both splits draw from (the "in-family" tasks): 1-4 hidden layers of
# widths 16-256, relu/tanh/gelu, batch 16-256, digits / breast cancer / wine / teacher-student
# regression, with and without input noise. Sizes are capped so that one task's 3000-step
# evaluation (3 seeds, 14 Adam runs) stays within a few minutes on 2 CPU cores.
MLP_WIDTHS = (16, 32, 64, 128, 256)
MLP_ACTIVATIONS = ("relu", "tanh", "gelu")
MLP_BATCHES = (16, 32, 64, 128, 256)
MLP_DATASETS = ("digits", "breast_cancer", "wine", "teacher")
MAX_MLP_PARAMS = 40_000
MAX_MLP_WORK = 3_000_000  # params x batch size


def _mlp_params(spec: MLPSpec) -> int:
    in_dim = {"digits": 64, "breast_cancer": 30, "wine": 13}.get(spec.dataset, spec.teacher_dim)
    out_dim = {"digits": 10, "breast_cancer": 2, "wine": 3}.get(spec.dataset, 1)
    sizes = (in_dim,) + tuple(spec.hidden) + (out_dim,)
    return sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))


def sample_mlp_specs(seed: int, count: int, exclude=(), init_scales=(1.0,), data_seeds=(0,)):
    """``count`` distinct MLPSpecs of the family drawn with numpy seed ``seed``, none in ``exclude``."""
    rng = np.random.RandomState(seed)
    out, seen = [], set(exclude)
    # every (data set, activation) pair in turn, so that small splits cover them evenly
    combos = [(d, a) for d in MLP_DATASETS for a in MLP_ACTIVATIONS]
    rng.shuffle(combos)
    while len(out) < count:
        dataset, activation = combos[len(out) % len(combos)]
        depth = int(rng.randint(1, 5))
        width = int(rng.choice(MLP_WIDTHS))
        # mostly constant width, sometimes a funnel (halving per layer, at least 16)
        hidden = tuple(max(16, width >> i) for i in range(depth)) if rng.rand() < 0.3 else (width,) * depth
        spec = MLPSpec(hidden, activation, int(rng.choice(MLP_BATCHES)),
                       float(rng.choice(init_scales)), dataset,
                       input_noise=0.0 if dataset == "teacher" else float(rng.choice((0.0, 0.0, 0.1, 0.3))),
                       data_seed=int(rng.choice(data_seeds)) if dataset == "teacher" else 0)
        n = _mlp_params(spec)
        if spec in seen or n > MAX_MLP_PARAMS or n * spec.batch_size > MAX_MLP_WORK:
            continue
        seen.add(spec)
        out.append(spec)
    return tuple(out)


_LEGACY_TRAIN_MLPS = (
    MLPSpec((32,), "relu", 64, 1.0),
    MLPSpec((64,), "tanh", 32, 1.0),
    MLPSpec((16,), "relu", 128, 2.0),
    MLPSpec((32, 32), "relu", 64, 1.0),
    MLPSpec((32, 16), "tanh", 128, 0.5),
)
_LEGACY_TEST_MLPS = (
    MLPSpec((48,), "relu", 64, 1.0),
    MLPSpec((24, 24), "tanh", 96, 1.0),
    MLPSpec((64, 32), "relu", 48, 1.0),
    MLPSpec((32,), "relu", 32, 1.0, dataset="breast_cancer"),
)
# Held-out in-family tasks (judged by `evaluate`): teachers 100-103, init scale 1.
TEST_MLP_SPECS = _LEGACY_TEST_MLPS + sample_mlp_specs(
    2026, 12, exclude=_LEGACY_TRAIN_MLPS, data_seeds=(100, 101, 102, 103))
# Meta-training MLPs: teachers 0-9, init scales 0.5-2 (an augmentation the tests do not use).
TRAIN_MLP_SPECS = _LEGACY_TRAIN_MLPS + sample_mlp_specs(
    7, 40, exclude=TEST_MLP_SPECS, init_scales=(0.5, 1.0, 1.0, 2.0), data_seeds=tuple(range(10)))

TRAIN_SPECS = TRAIN_MLP_SPECS + (
    ConvSpec((4, 8), 32),
    CharLMSpec("rnn", 32, 16, 16),
    QuadraticSpec(32, 2.0, 0.1, 0), QuadraticSpec(32, 2.0, 0.1, 1), QuadraticSpec(32, 2.0, 0.1, 2),
    LogRegSpec(16, 512, 32, 0), LogRegSpec(16, 512, 32, 1), LogRegSpec(16, 512, 32, 2),
)

# More fresh-sample (data-rich) tasks, so that the evaluation's data-rich group is not 3 tasks:
# teachers 100-103 as above, shapes the sampled test MLPs do not have.
TEST_DATA_RICH_SPECS = (
    MLPSpec((64,), "tanh", 32, 1.0, "teacher", data_seed=100),
    MLPSpec((32, 32), "relu", 128, 1.0, "teacher", data_seed=101),
    MLPSpec((256,), "gelu", 64, 1.0, "teacher", data_seed=102),
    MLPSpec((64, 64, 64), "tanh", 16, 1.0, "teacher", data_seed=102),
    MLPSpec((128, 64), "relu", 32, 1.0, "teacher", data_seed=100),
)
TEST_SPECS = TEST_MLP_SPECS + TEST_DATA_RICH_SPECS

# Harder or outside cases, reported beside the judged split: a convnet and a char RNN of unseen
# shapes, a transformer LM (attention never appears in meta-training), held-out seeds of the
# synthetic quadratics and logistic regressions.
OUT_OF_FAMILY_SPECS = (
    ConvSpec((8, 16), 64),
    CharLMSpec("rnn", 48, 24, 16),
    CharLMSpec("transformer", 32, 32, 16),
    QuadraticSpec(32, 2.0, 0.1, 100), QuadraticSpec(32, 2.0, 0.1, 101),
    LogRegSpec(16, 512, 32, 100), LogRegSpec(16, 512, 32, 101),
)

SPLITS = {"train": TRAIN_SPECS, "test": TEST_SPECS, "outside": OUT_OF_FAMILY_SPECS}


def task_name(spec) -> str:
    if isinstance(spec, MLPSpec):
        data = spec.dataset
        if data == "teacher":
            data = f"teacher{spec.teacher_dim}-{spec.data_seed}"
        noise = f"_noise{spec.input_noise:g}" if spec.input_noise else ""
        return (f"mlp_{data}_{'x'.join(map(str, spec.hidden))}_{spec.activation}"
                f"_b{spec.batch_size}_s{spec.init_scale:g}{noise}")
    if isinstance(spec, ConvSpec):
        return f"conv_digits_{'x'.join(map(str, spec.channels))}_b{spec.batch_size}"
    if isinstance(spec, CharLMSpec):
        return f"charlm_{spec.arch}_w{spec.width}_t{spec.seq_len}_b{spec.batch_size}"
    if isinstance(spec, QuadraticSpec):
        return f"quadratic_d{spec.dim}_c{spec.log_cond:g}_n{spec.noise:g}_seed{spec.seed}"
    if isinstance(spec, LogRegSpec):
        return f"logreg_d{spec.dim}_n{spec.num_train}_b{spec.batch_size}_seed{spec.seed}"
    raise TypeError(f"unknown task spec {spec!r}")


def _dense_init(key, fan_in, fan_out, scale=1.0):
    w = scale * jax.random.normal(key, (fan_in, fan_out), jnp.float32) / math.sqrt(fan_in)
    return {"w": w, "b": jnp.zeros((fan_out,), jnp.float32)}


def _classification_task(spec, name, split, init, apply, batch_size, input_noise=0.0):
    x_tr, y_tr, x_va, y_va, x_te, y_te = (jnp.asarray(split[k]) for k in (
        "x_train", "y_train", "x_valid", "y_valid", "x_test", "y_test"))
    n, n_valid = x_tr.shape[0], x_va.shape[0]

    def loss(params, batch):
        x, y = batch
        return softmax_xent(apply(params, x), y)

    def sample_batch(key):
        k_idx, k_noise = jax.random.split(key)
        idx = jax.random.randint(k_idx, (batch_size,), 0, n)
        x = x_tr[idx]
        if input_noise:
            x = x + input_noise * jax.random.normal(k_noise, x.shape, x.dtype)
        return x, y_tr[idx]

    def sample_valid_batch(key):
        idx = jax.random.randint(key, (batch_size,), 0, n_valid)
        return x_va[idx], y_va[idx]

    return Task(name=name, spec=spec, init=init, loss=loss, sample_batch=sample_batch,
                train_loss=lambda p: loss(p, (x_tr, y_tr)), eval_loss=lambda p: loss(p, (x_te, y_te)),
                loss_scale=math.log(split["num_classes"]), sample_valid_batch=sample_valid_batch)


def _teacher_task(spec: MLPSpec, init, apply) -> Task:
    t = _data.teacher(spec.teacher_dim, spec.data_seed)
    w1, b1, w2 = (jnp.asarray(t[k]) for k in ("w1", "b1", "w2"))
    x_va, y_va, x_te, y_te = (jnp.asarray(t[k]) for k in ("x_valid", "y_valid", "x_test", "y_test"))
    noise = 0.1  # label noise of the training stream: the best achievable MSE is 0.01

    def loss(params, batch):
        x, y = batch
        return jnp.mean((apply(params, x)[:, 0] - y) ** 2)

    def sample_batch(key):
        k_x, k_y = jax.random.split(key)
        x = jax.random.normal(k_x, (spec.batch_size, spec.teacher_dim), jnp.float32)
        y = (jnp.tanh(x @ w1 + b1) @ w2)[:, 0] + noise * jax.random.normal(k_y, (spec.batch_size,))
        return x, y

    def sample_valid_batch(key):
        idx = jax.random.randint(key, (spec.batch_size,), 0, x_va.shape[0])
        return x_va[idx], y_va[idx]

    # the training loss is measured on the fixed validation inputs (clean labels): the stream
    # itself is infinite and never repeats
    return Task(name=task_name(spec), spec=spec, init=init, loss=loss, sample_batch=sample_batch,
                train_loss=lambda p: loss(p, (x_va, y_va)), eval_loss=lambda p: loss(p, (x_te, y_te)),
                loss_scale=float(np.mean(t["y_test"] ** 2)) + 1.0, sample_valid_batch=sample_valid_batch)


def _mlp_task(spec: MLPSpec) -> Task:
    if spec.dataset == "teacher":
        in_dim, out_dim, split = spec.teacher_dim, 1, None
    elif spec.dataset in _data.CLASSIFICATION_DATASETS:
        split = dict(_data.classification(spec.dataset))
        for k in ("x_train", "x_valid", "x_test"):
            split[k] = split[k].reshape(len(split[k]), -1)
        in_dim, out_dim = split["x_train"].shape[1], split["num_classes"]
    else:
        raise ValueError(f"unknown dataset {spec.dataset!r}")
    act = _ACTS[spec.activation]
    sizes = (in_dim,) + tuple(spec.hidden) + (out_dim,)

    def init(key):
        keys = jax.random.split(key, len(sizes) - 1)
        return {f"layer_{i}": _dense_init(keys[i], sizes[i], sizes[i + 1], spec.init_scale)
                for i in range(len(sizes) - 1)}

    def apply(params, x):
        h = x
        for i in range(len(sizes) - 1):
            h = h @ params[f"layer_{i}"]["w"] + params[f"layer_{i}"]["b"]
            if i < len(sizes) - 2:
                h = act(h)
        return h

    if split is None:
        return _teacher_task(spec, init, apply)
    return _classification_task(spec, task_name(spec), split, init, apply, spec.batch_size,
                                spec.input_noise)


def _conv_task(spec: ConvSpec) -> Task:
    act = _ACTS[spec.activation]
    chans = (1,) + tuple(spec.channels)

    def init(key):
        keys = jax.random.split(key, len(chans))
        params = {}
        for i in range(len(chans) - 1):
            fan_in = 9 * chans[i]
            params[f"conv_{i}"] = {
                "w": jax.random.normal(keys[i], (3, 3, chans[i], chans[i + 1]), jnp.float32) / math.sqrt(fan_in),
                "b": jnp.zeros((chans[i + 1],), jnp.float32)}
        params["head"] = _dense_init(keys[-1], chans[-1], 10)
        return params

    def apply(params, x):
        h = x
        for i in range(len(chans) - 1):
            h = jax.lax.conv_general_dilated(h, params[f"conv_{i}"]["w"], (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            h = act(h + params[f"conv_{i}"]["b"])
            if i == 0:  # 8x8 -> 4x4
                h = jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4.0
        h = jnp.mean(h, axis=(1, 2))
        return h @ params["head"]["w"] + params["head"]["b"]

    return _classification_task(spec, task_name(spec), _data.classification("digits"), init, apply,
                                spec.batch_size)


def _layer_norm(x, eps=1e-5):
    mu = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean((x - mu) ** 2, -1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps)


def _charlm_task(spec: CharLMSpec) -> Task:
    train_ids, test_ids, vocab = _data.text_corpus()
    v, w, t = len(vocab), spec.width, spec.seq_len
    train_ids, test_ids = jnp.asarray(train_ids), jnp.asarray(test_ids)

    def windows(ids, starts):
        return jax.vmap(lambda s: jax.lax.dynamic_slice(ids, (s,), (t + 1,)))(starts)

    if spec.arch == "rnn":
        def init(key):
            k = jax.random.split(key, 4)
            return {"embed": jax.random.normal(k[0], (v, w), jnp.float32) * 0.5,
                    "rnn": {"wx": jax.random.normal(k[1], (w, w), jnp.float32) / math.sqrt(w),
                            "wh": jax.random.normal(k[2], (w, w), jnp.float32) * 0.5 / math.sqrt(w),
                            "b": jnp.zeros((w,), jnp.float32)},
                    "head": _dense_init(k[3], w, v)}

        def apply(params, x):  # x [B, T] -> logits [B, T, V]
            emb = params["embed"][x]
            r = params["rnn"]

            def cell(h, e):
                h = jnp.tanh(e @ r["wx"] + h @ r["wh"] + r["b"])
                return h, h

            _, hs = jax.lax.scan(cell, jnp.zeros((x.shape[0], w), jnp.float32), jnp.swapaxes(emb, 0, 1))
            hs = jnp.swapaxes(hs, 0, 1)
            return hs @ params["head"]["w"] + params["head"]["b"]
    elif spec.arch == "transformer":
        def init(key):
            k = jax.random.split(key, 8)
            d = lambda kk, a, b: jax.random.normal(kk, (a, b), jnp.float32) / math.sqrt(a)
            return {"embed": jax.random.normal(k[0], (v, w), jnp.float32) * 0.5,
                    "pos": jax.random.normal(k[1], (t, w), jnp.float32) * 0.1,
                    "attn": {"q": d(k[2], w, w), "k": d(k[3], w, w), "v": d(k[4], w, w), "o": d(k[5], w, w)},
                    "mlp": {"w1": _dense_init(k[6], w, 2 * w), "w2": _dense_init(k[7], 2 * w, w)},
                    "head": {"w": jnp.zeros((w, v), jnp.float32), "b": jnp.zeros((v,), jnp.float32)}}

        def apply(params, x):
            h = params["embed"][x] + params["pos"][None, : x.shape[1]]
            a = params["attn"]
            z = _layer_norm(h)
            q, k_, vv = z @ a["q"], z @ a["k"], z @ a["v"]
            scores = jnp.einsum("btd,bsd->bts", q, k_) / math.sqrt(w)
            mask = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
            scores = jnp.where(mask, scores, -1e9)
            h = h + jnp.einsum("bts,bsd->btd", jax.nn.softmax(scores, -1), vv) @ a["o"]
            m = params["mlp"]
            z = _layer_norm(h)
            z = jax.nn.gelu(z @ m["w1"]["w"] + m["w1"]["b"]) @ m["w2"]["w"] + m["w2"]["b"]
            h = _layer_norm(h + z)
            return h @ params["head"]["w"] + params["head"]["b"]
    else:
        raise ValueError(f"unknown char LM arch {spec.arch!r}")

    def loss(params, batch):
        logits = apply(params, batch[:, :-1])
        return softmax_xent(logits, batch[:, 1:])

    def sample_batch(key):
        starts = jax.random.randint(key, (spec.batch_size,), 0, train_ids.shape[0] - t - 1)
        return windows(train_ids, starts)

    # fixed evaluation windows: 64 evenly spaced windows of each split
    tr_eval = windows(train_ids, jnp.linspace(0, train_ids.shape[0] - t - 2, 64).astype(jnp.int32))
    te_eval = windows(test_ids, jnp.linspace(0, test_ids.shape[0] - t - 2, 64).astype(jnp.int32))
    return Task(name=task_name(spec), spec=spec, init=init, loss=loss, sample_batch=sample_batch,
                train_loss=lambda p: loss(p, tr_eval), eval_loss=lambda p: loss(p, te_eval),
                loss_scale=math.log(v))


def _quadratic_task(spec: QuadraticSpec) -> Task:
    rng = np.random.RandomState(spec.seed)
    h = jnp.asarray(10.0 ** rng.uniform(0, spec.log_cond, spec.dim), jnp.float32)
    c = jnp.asarray(rng.normal(size=spec.dim), jnp.float32)

    def clean(params):
        return 0.5 * jnp.sum(h * (params["x"] - c) ** 2)

    def loss(params, batch):  # the batch is gradient noise
        return clean(params) + jnp.dot(batch, params["x"])

    def sample_batch(key):
        return spec.noise * jax.random.normal(key, (spec.dim,), jnp.float32)

    return Task(name=task_name(spec), spec=spec, init=lambda k: {"x": jax.random.normal(k, (spec.dim,), jnp.float32)},
                loss=loss, sample_batch=sample_batch, train_loss=clean, eval_loss=clean,
                loss_scale=float(0.5 * jnp.sum(h * (1.0 + c ** 2))),
                sample_valid_batch=lambda key: jnp.zeros((spec.dim,), jnp.float32))


def _logreg_task(spec: LogRegSpec) -> Task:
    rng = np.random.RandomState(spec.seed)
    n_test = spec.num_train // 4
    w_true = rng.normal(size=spec.dim)
    x = rng.normal(size=(spec.num_train + n_test, spec.dim)).astype(np.float32)
    y = ((x @ w_true + 0.5 * rng.normal(size=len(x))) > 0).astype(np.float32)
    x_tr, y_tr = jnp.asarray(x[:spec.num_train]), jnp.asarray(y[:spec.num_train])
    x_te, y_te = jnp.asarray(x[spec.num_train:]), jnp.asarray(y[spec.num_train:])
    rng_valid = np.random.RandomState(spec.seed + 7919)  # same w_true, separate samples
    x_va = rng_valid.normal(size=(n_test, spec.dim)).astype(np.float32)
    y_va = jnp.asarray(((x_va @ w_true + 0.5 * rng_valid.normal(size=n_test)) > 0).astype(np.float32))
    x_va = jnp.asarray(x_va)

    def loss(params, batch):
        xb, yb = batch
        z = xb @ params["w"] + params["b"]
        return jnp.mean(jax.nn.softplus(z) - yb * z)

    def sample_batch(key):
        idx = jax.random.randint(key, (spec.batch_size,), 0, spec.num_train)
        return x_tr[idx], y_tr[idx]

    return Task(name=task_name(spec), spec=spec,
                init=lambda k: {"w": 0.1 * jax.random.normal(k, (spec.dim,), jnp.float32), "b": jnp.zeros((), jnp.float32)},
                loss=loss, sample_batch=sample_batch, train_loss=lambda p: loss(p, (x_tr, y_tr)),
                eval_loss=lambda p: loss(p, (x_te, y_te)), loss_scale=math.log(2.0),
                sample_valid_batch=lambda key: (lambda i: (x_va[i], y_va[i]))(
                    jax.random.randint(key, (spec.batch_size,), 0, n_test)))


_BUILDERS = {MLPSpec: _mlp_task, ConvSpec: _conv_task, CharLMSpec: _charlm_task,
             QuadraticSpec: _quadratic_task, LogRegSpec: _logreg_task}


@functools.lru_cache(maxsize=None)
def make_task(spec) -> Task:
    """The Task for ``spec`` (cached: the same spec gives the same object, so jit caches hit)."""
    try:
        builder = _BUILDERS[type(spec)]
    except KeyError:
        raise TypeError(f"unknown task spec {spec!r}") from None
    return builder(spec)


def get_spec(name: str):
    """The spec of any split's task by its name (see ``list_tasks``)."""
    for specs in SPLITS.values():
        for spec in specs:
            if task_name(spec) == name:
                return spec
    raise KeyError(f"no task named {name!r}; known: {list_tasks()}")


def get_task(name: str) -> Task:
    """The task of any split by its name (see ``list_tasks``)."""
    return make_task(get_spec(name))


def data_regime(name: str) -> str:
    """"data-rich" when every batch is a fresh sample (teacher regressors; quadratics, whose
    batches are gradient noise): the held-out loss tracks the training loss. "small-data" when
    training cycles through a fixed training set, where overfitting decides the held-out loss."""
    spec = get_spec(name)
    fresh = isinstance(spec, QuadraticSpec) or (isinstance(spec, MLPSpec) and spec.dataset == "teacher")
    return "data-rich" if fresh else "small-data"


def list_tasks(split: str | None = None):
    splits = [split] if split else list(SPLITS)
    return [task_name(s) for sp in splits for s in SPLITS[sp]]


class TaskSampler:
    """Draws tasks of one split uniformly; deterministic given a numpy Generator."""

    def __init__(self, split: str = "train", specs=None):
        if specs is None:
            if split not in SPLITS:
                raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
            specs = SPLITS[split]
        self.specs = tuple(specs)

    def sample(self, rng: np.random.Generator) -> Task:
        return make_task(self.specs[int(rng.integers(len(self.specs)))])

"""The offline task family: every task works, splits are disjoint, losses match hand formulas."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lopt_ext import tasks
from lopt_ext.tasks import data, family

ALL = [n for s in tasks.SPLITS for n in tasks.list_tasks(s)]
FAST = ["mlp_digits_16_relu_b128_s2", "conv_digits_4x8_b32",
        "quadratic_d32_c2_n0.1_seed0", "logreg_d16_n512_b32_seed0",
        "mlp_wine_16_gelu_b64_s1_noise0.3", "mlp_teacher16-103_128_relu_b256_s1",
        "mlp_breast_cancer_32_relu_b32_s1"]  # the rest (char LMs among them) run with -m slow


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in ALL])
def test_task_contract(name):
    task = tasks.get_task(name)
    params = task.init(jax.random.PRNGKey(0))
    b1 = task.sample_batch(jax.random.PRNGKey(1))
    b2 = task.sample_batch(jax.random.PRNGKey(1))
    for x, y in zip(jax.tree_util.tree_leaves(b1), jax.tree_util.tree_leaves(b2)):
        np.testing.assert_array_equal(x, y)  # the stream is a pure function of the key
    loss = task.loss(params, b1)
    assert loss.shape == () and np.isfinite(loss)
    grads = jax.grad(task.loss)(params, b1)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
    assert np.isfinite(task.train_loss(params)) and np.isfinite(task.eval_loss(params))
    vb = task.valid_batch(jax.random.PRNGKey(1))
    assert np.isfinite(task.loss(params, vb))
    assert task.loss_scale > 0
    assert task.num_params() == sum(x.size for x in jax.tree_util.tree_leaves(params))
    # the initial loss is of the order of the normaliser used by meta-training
    assert 0.1 < float(task.train_loss(params)) / task.loss_scale < 10


def test_splits_disjoint_and_documented():
    train, test, out = (set(tasks.list_tasks(s)) for s in ("train", "test", "outside"))
    assert not train & test and not train & out and not test & out
    assert len(train) == len(family.TRAIN_SPECS) and len(test) == len(family.TEST_SPECS)
    # the judged held-out split: >= 12 MLPs of the family, every data set, activation and
    # depth 1-4, with and without input noise; teachers never seen in meta-training
    assert len(family.TEST_SPECS) >= 12 and all(isinstance(s, family.MLPSpec) for s in family.TEST_SPECS)
    for attr, values in (("dataset", family.MLP_DATASETS), ("activation", family.MLP_ACTIVATIONS)):
        assert {getattr(s, attr) for s in family.TEST_SPECS} == set(values)
    assert {len(s.hidden) for s in family.TEST_SPECS} == {1, 2, 3, 4}
    assert {s.input_noise > 0 for s in family.TEST_SPECS} == {True, False}
    teach = lambda specs: {s.data_seed for s in specs if isinstance(s, family.MLPSpec) and s.dataset == "teacher"}
    assert teach(family.TEST_SPECS) and not teach(family.TEST_SPECS) & teach(family.TRAIN_SPECS)
    for s in family.TEST_SPECS + family.TRAIN_MLP_SPECS:
        assert 16 <= min(s.hidden) and max(s.hidden) <= 256 and 16 <= s.batch_size <= 256
    # held-out architectures: no MLP/conv/RNN shape of the test split occurs in training
    arch = lambda s: {k: v for k, v in vars(s).items() if k != "seed"}
    train_arch = [(type(s), arch(s)) for s in family.TRAIN_SPECS if not hasattr(s, "seed")]
    for s in family.TEST_SPECS:
        if hasattr(s, "seed"):
            assert s.seed not in {t.seed for t in family.TRAIN_SPECS if type(t) is type(s)}
        else:
            assert (type(s), arch(s)) not in train_arch
    kinds = {type(s).__name__ for s in family.TRAIN_SPECS}
    assert kinds == {"MLPSpec", "ConvSpec", "CharLMSpec", "QuadraticSpec", "LogRegSpec"}


def test_sampler_deterministic_and_in_split():
    s = tasks.TaskSampler("train")
    draw = lambda: [t.name for t in (lambda r: [s.sample(r) for _ in range(20)])(np.random.default_rng(4))]
    a, b = draw(), draw()
    assert a == b
    assert set(a) <= set(tasks.list_tasks("train"))
    with pytest.raises(ValueError, match="split"):
        tasks.TaskSampler("nope")


def test_classification_splits():
    for name, n, shape in (("digits", 1797, (8, 8, 1)), ("breast_cancer", 569, (30,)), ("wine", 178, (13,))):
        d = data.classification(name)
        sizes = [len(d[f"y_{k}"]) for k in ("train", "valid", "test")]
        assert sum(sizes) == n and d["x_train"].shape[1:] == shape
        assert abs(sizes[2] - 0.2 * n) <= 1 and abs(sizes[1] - 0.16 * n) <= 1
        # index-disjoint: no row of one part equals a row of another (these sets have no duplicates)
        rows = lambda x: {r.tobytes() for r in x.reshape(len(x), -1)}
        assert not rows(d["x_train"]) & rows(d["x_test"]) and not rows(d["x_valid"]) & rows(d["x_test"])
    x = data.classification("digits")["x_train"]
    assert x.min() >= 0 and x.max() <= 1
    x = data.classification("wine")["x_train"]
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-5)


def test_teacher_regression_matches_numpy():
    task = tasks.get_task("mlp_teacher16-103_128_relu_b256_s1")
    t = data.teacher(16, 103)
    p = task.init(jax.random.PRNGKey(0))
    x, y = task.sample_batch(jax.random.PRNGKey(3))
    clean = np.tanh(np.asarray(x, np.float64) @ t["w1"] + t["b1"]) @ t["w2"]
    assert 0 < np.std(np.asarray(y) - clean[:, 0]) < 0.2  # label noise 0.1 on fresh inputs
    h = np.maximum(np.asarray(x, np.float64) @ np.asarray(p["layer_0"]["w"]) + np.asarray(p["layer_0"]["b"]), 0)
    out = h @ np.asarray(p["layer_1"]["w"]) + np.asarray(p["layer_1"]["b"])
    np.testing.assert_allclose(float(task.loss(p, (x, y))), np.mean((out[:, 0] - np.asarray(y)) ** 2), rtol=1e-4)
    x2, _ = task.sample_batch(jax.random.PRNGKey(4))
    assert not np.allclose(x, x2)  # fresh samples every batch


def test_text_corpus_offline():
    tr, te, vocab = data.text_corpus()
    assert len(tr) > 20000 and len(te) > 2000
    assert all(32 <= ord(c) < 127 or c == "\n" for c in vocab)
    assert tr.max() < len(vocab)


def test_mlp_loss_matches_numpy():
    task = tasks.get_task("mlp_digits_32x16_tanh_b128_s0.5")
    p = task.init(jax.random.PRNGKey(2))
    x, y = task.sample_batch(jax.random.PRNGKey(5))
    h = np.asarray(x, np.float64)
    for i in range(3):
        h = h @ np.asarray(p[f"layer_{i}"]["w"], np.float64) + np.asarray(p[f"layer_{i}"]["b"], np.float64)
        if i < 2:
            h = np.tanh(h)
    h = h - h.max(1, keepdims=True)
    logp = h - np.log(np.exp(h).sum(1, keepdims=True))
    expected = -np.mean(logp[np.arange(len(y)), np.asarray(y)])
    np.testing.assert_allclose(float(task.loss(p, (x, y))), expected, rtol=1e-5)


def test_quadratic_and_logreg_match_formulas():
    spec = family.QuadraticSpec(32, 2.0, 0.1, 0)
    task = family.make_task(spec)
    rng = np.random.RandomState(0)
    h = 10.0 ** rng.uniform(0, 2.0, 32)
    c = rng.normal(size=32)
    x = np.linspace(-1, 1, 32)
    np.testing.assert_allclose(float(task.eval_loss({"x": jnp.asarray(x, jnp.float32)})),
                               0.5 * np.sum(h * (x - c) ** 2), rtol=1e-5)
    noise = task.sample_batch(jax.random.PRNGKey(0))
    np.testing.assert_allclose(float(task.loss({"x": jnp.asarray(x, jnp.float32)}, noise)),
                               0.5 * np.sum(h * (x - c) ** 2) + np.dot(np.asarray(noise), x), rtol=1e-5)

    lr = tasks.get_task("logreg_d16_n512_b32_seed0")
    p = {"w": jnp.linspace(-1, 1, 16), "b": jnp.float32(0.3)}
    xb, yb = lr.sample_batch(jax.random.PRNGKey(3))
    z = np.asarray(xb, np.float64) @ np.linspace(-1, 1, 16) + 0.3
    yb = np.asarray(yb, np.float64)
    expected = np.mean(-yb * np.log(1 / (1 + np.exp(-z))) - (1 - yb) * np.log(1 - 1 / (1 + np.exp(-z))))
    np.testing.assert_allclose(float(lr.loss(p, (xb, yb))), expected, rtol=1e-5)


def test_family_tasks_are_learnable_with_adam():
    import optax
    task = tasks.get_task("conv_digits_4x8_b32")
    params = task.init(jax.random.PRNGKey(0))
    tx = optax.adam(1e-2)
    state = tx.init(params)

    @jax.jit
    def step(params, state, i):
        g = jax.grad(task.loss)(params, task.sample_batch(jax.random.PRNGKey(i)))
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    before = float(task.train_loss(params))
    for i in range(150):
        params, state = step(params, state, i)
    assert float(task.train_loss(params)) < 0.7 * before
    assert math.isclose(task.loss_scale, math.log(10))


def test_reparameterized_task_is_the_same_problem_in_scaled_coordinates():
    from lopt_ext.tasks import augment
    task = tasks.get_task("mlp_digits_32x16_tanh_b128_s0.5")
    aug = augment.reparameterized(task, seed=3, log10_range=1.0)
    scales = augment.reparameterization_scales(task, 3, 1.0)
    s = jax.tree_util.tree_leaves(scales)
    assert aug.name == task.name + "@reparam3" and len(set(s)) == len(s)
    assert all(0.1 <= x <= 10.0 for x in s)
    assert s != jax.tree_util.tree_leaves(augment.reparameterization_scales(task, 4, 1.0))
    key, batch = jax.random.PRNGKey(2), task.sample_batch(jax.random.PRNGKey(5))
    p, q = task.init(key), aug.init(key)
    # stored q = p / s, by hand per tensor
    for pl, ql, sl in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(q), s):
        np.testing.assert_allclose(np.asarray(ql), np.asarray(pl) / sl, rtol=1e-6)
    for g in ((lambda t, x: t.loss(x, batch)), (lambda t, x: t.train_loss(x)), (lambda t, x: t.eval_loss(x))):
        np.testing.assert_allclose(float(g(aug, q)), float(g(task, p)), rtol=1e-5)
    # chain rule: dL/dq = s * dL/dp
    gp = jax.grad(task.loss)(p, batch)
    gq = jax.grad(aug.loss)(q, batch)
    for a, b, sl in zip(jax.tree_util.tree_leaves(gq), jax.tree_util.tree_leaves(gp), s):
        np.testing.assert_allclose(np.asarray(a), sl * np.asarray(b), rtol=1e-4, atol=1e-7 * sl)
    # range 0 is the task itself, and a negative range is refused
    assert all(x == 1.0 for x in jax.tree_util.tree_leaves(augment.reparameterization_scales(task, 3, 0.0)))
    with pytest.raises(ValueError, match="log10_range"):
        augment.reparameterized(task, 3, -1.0)

"""Celo: the pure-JAX reference and the fused CPU kernel against trajectories of Celo's own code
(tools/celo_trajectories.py), the loader against the published theta.state, and the loss /
horizon arguments of the optax API."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lopt_ext
from lopt_ext import Celo, pretrained
from lopt_ext.celo import load_theta_state

HERE = os.path.dirname(__file__)
DATA = os.path.join(HERE, "data", "celo_trajectories.npz")
THETA_STATE = os.path.join(HERE, "..", "..", "shared", "data", "celo", "theta.state")
needs_theta = pytest.mark.skipif(not os.path.exists(THETA_STATE), reason="../shared/data/celo/theta.state not found")
needs_kernels = pytest.mark.skipif(not lopt_ext.kernels_available(), reason="compiled kernels not built")
IMPLS = ["reference", pytest.param("fused", marks=needs_kernels)]


def _assert_close(a, b, what, abs_tol=None, extra=0.0):
    """The spec's bar |a - b| <= 1e-6 max|b| + 1e-5 |b| (+ extra), or an absolute one."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    if b.size == 0:
        return
    tol = 1e-6 * np.max(np.abs(b)) + 1e-5 * np.abs(b) + extra if abs_tol is None else abs_tol
    assert np.all(np.abs(a - b) <= tol), (what, float(np.max(np.abs(a - b) - tol)))


# Celo's loss features divide differences of nearly equal loss averages by their spread, so
# float32 round-off in the averages (which agree to 1e-7 here) is amplified: at step 3 of the
# 20-step horizon a feature of -0.0224 differs from its float64 value by 1.1e-5 in float32 in
# either program. The LSTM state (|h| < 1) inherits that: measured 2e-5 apart.
LSTM_ABS_TOL = 1e-4
# With the 1000-step horizon the 10 loss averages are nearly equal in the first steps, and the
# features' round-off moves lr_mult: Celo's own code run eagerly leaves its jitted trajectory by
# 1.0x the spec's bar within 12 steps there. That case's params are also allowed 1% of the
# distance each element has moved (measured: 0.7%), and its loss buffer 1e-4 relative: there
# 1 - decay^(t+1) is 0.005 at step 4, which turns the decay's float32 round-off (6e-8) into
# 1.2e-5 of the bias-corrected averages; its loss features at step 3 differ from float64 by up
# to 2.3e-4 in float32, so its LSTM state is allowed 1e-3. Cases 0 and 1 keep the spec's bar.
ILL_CONDITIONED = {"case2": 1e-2}


def _case_theta(data, case, published):
    """The case's theta in lopt_ext's (= Celo's) layout: the published one, or the recorded
    perturbation of it."""
    if f"{case}/theta/rnn_params/step_size/w" not in data.files:
        return published
    paths, treedef = jax.tree_util.tree_flatten_with_path(published)
    keys = ["/".join(str(k.key) for k in path) for path, _ in paths]
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(data[f"{case}/theta/{k}"]) for k in keys])


@needs_theta
@pytest.mark.parametrize("impl", IMPLS)
def test_trajectories_match_celos_own_code(impl):
    """30 steps of Celo's code: the published and a perturbed theta, gradients of scale 1, 3000
    (past the +-1000 clip) and 1e-4, ranks 0-4, a noisy loss with a jump, horizons 20, 40 and
    1000. Per element |a - b| <= 1e-6 max|b| + 1e-5 |b| for the params after every step (each
    trajectory runs on its own outputs), the momenta, the loss buffer and the LSTM state at the
    recorded steps."""
    data = np.load(DATA)
    lopt, published = load_theta_state(THETA_STATE)
    m_steps = list(data["m_steps"])
    cases = sorted({k.split("/")[0] for k in data.files if k.startswith("case")})
    assert len(cases) == 3
    for case in cases:
        theta = _case_theta(data, case, published)
        num_steps = int(data[f"{case}/config"][2])
        names = sorted({k.split("/")[-1] for k in data.files if k.startswith(f"{case}/p0/")})
        params = {k: jnp.asarray(data[f"{case}/p0/{k}"]) for k in names}
        tx = lopt.transform(theta, impl=impl, num_steps=num_steps)
        update = jax.jit(tx.update)
        state = tx.init(params)
        losses = data[f"{case}/losses"]
        for t in range(len(losses)):
            grads = {k: jnp.asarray(data[f"{case}/grads/{k}"][t]) for k in names}
            u, state = update(grads, state, params, value=losses[t])
            params = optax.apply_updates(params, u)
            for k in names:
                want = data[f"{case}/p/{k}"][t]
                moved = ILL_CONDITIONED.get(case, 0.0) * np.abs(want - data[f"{case}/p0/{k}"])
                _assert_close(params[k], want, f"{case} step {t} params {k}", extra=moved)
            if t in m_steps:
                s = m_steps.index(t)
                for k in names:
                    _assert_close(state.m[k], data[f"{case}/m/{k}"][s], f"{case} step {t} m {k}")
                for name in ("loss_means", "loss_min"):
                    want = data[f"{case}/{name}"][s]
                    _assert_close(getattr(state, name), want, f"{case} step {t} {name}",
                                  extra=ILL_CONDITIONED.get(case, 0.0) * 1e-2 * np.abs(want))
                hidden = np.stack([state.lstm_hidden[k] for k in names])
                _assert_close(hidden, data[f"{case}/lstm_hidden"][s], f"{case} step {t} lstm hidden",
                              abs_tol=LSTM_ABS_TOL * (10 if case in ILL_CONDITIONED else 1))


def _published():
    return load_theta_state(THETA_STATE)


def _inputs(shapes, seed, grad_scale=1.0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 2 * len(shapes))
    params = {f"t{i}": jax.random.normal(keys[2 * i], s) for i, s in enumerate(shapes)}
    grads = {f"t{i}": grad_scale * jax.random.normal(keys[2 * i + 1], s) for i, s in enumerate(shapes)}
    return params, grads


@needs_theta
@needs_kernels
@pytest.mark.parametrize("shapes", [[(33000,), (3,), ()], [(129, 257), (2, 3, 40)], [(2, 3, 9000)]])
def test_fused_matches_reference_step_by_step(shapes):
    """Tensors spanning several kernel chunks (16384 elements), gradients past the +-1000
    clip: each fused step (tx.update, write_delta) and fused_update (new params) against the
    reference from the same state, with the spec's bar."""
    lopt, theta = _published()
    params, grads = _inputs(shapes, 1, grad_scale=800.0)
    fused = jax.jit(lambda s, p, g, v: lopt_ext.fused_update(lopt, theta, s, params=p, grads=g, value=v))
    ref = jax.jit(lambda s, p, g, v: lopt_ext.fused_update(lopt, theta, s, params=p, grads=g, value=v,
                                                           impl="reference"))
    tx = jax.jit(lopt.transform(theta, impl="fused", num_steps=6).update)
    ref_tx = jax.jit(lopt.transform(theta, impl="reference", num_steps=6).update)
    state = lopt_ext.init_state(lopt, params, num_steps=6)
    for t in range(6):
        g = jax.tree_util.tree_map(lambda x: x * (1.0 + 0.1 * t), grads)
        value = jnp.float32(2.0 / (1 + t))
        p_fused, _ = fused(state, params, g, value)
        u, s_tx = tx(g, state, params, value=value)
        u_ref, _ = ref_tx(g, state, params, value=value)
        p_ref, state = ref(state, params, g, value)
        for k in params:
            _assert_close(p_fused[k], p_ref[k], f"params {t} {k}")
            _assert_close(u[k], u_ref[k], f"update {t} {k}")
        for field in ("m", "rms", "v_row", "v_col", "v_full"):
            for k in params:
                _assert_close(getattr(s_tx, field)[k], getattr(state, field)[k], f"{field} {t} {k}")
        params = p_ref


@needs_theta
@needs_kernels
def test_vmapped_population_matches_members():
    """A population (theta perturbed per member) under jax.vmap is one custom call; each member
    equals its own unbatched step."""
    lopt, theta = _published()
    params, grads = _inputs([(6, 5), (7,), ()], 2)
    thetas = [jax.tree_util.tree_map(lambda x, i=i: x * (1.0 + 0.05 * i), theta) for i in range(3)]
    stack = lambda xs: jax.tree_util.tree_map(lambda *a: jnp.stack(a), *xs)  # noqa: E731
    state = lopt_ext.init_state(lopt, params, num_steps=10)

    def one(th, p, g, v):
        return lopt_ext.fused_update(lopt, th, state, params=p, grads=g, value=v)

    values = jnp.asarray([1.0, 2.0, 0.5])
    batched, _ = jax.jit(jax.vmap(one))(stack(thetas), stack([params] * 3), stack([grads] * 3), values)
    for i in range(3):
        single, _ = jax.jit(one)(thetas[i], params, grads, values[i])
        for k in params:
            _assert_close(batched[k][i], single[k], f"member {i} {k}")


def test_loss_and_horizon_are_required_and_checked():
    lopt = Celo()
    theta = lopt.init_theta(jax.random.PRNGKey(0))
    params = {"w": jnp.ones((3, 2))}
    with pytest.raises(ValueError, match="num_steps"):
        lopt.transform(theta)
    for bad, err in ((0, ValueError), (-5, ValueError), (2.5, TypeError), (True, TypeError), ("10", TypeError)):
        with pytest.raises(err, match="num_steps"):
            lopt.transform(theta, num_steps=bad)
    tx = lopt.transform(theta, impl="reference", num_steps=10)
    state = tx.init(params)
    with pytest.raises(ValueError, match="value"):
        tx.update(params, state, params)
    with pytest.raises(TypeError, match="value"):
        tx.update(params, state, params, value=jnp.ones(2))
    with pytest.raises(TypeError, match="value"):
        tx.update(params, state, params, value="loss")
    # fused_update: a state made without a horizon needs one per call
    bare = lopt_ext.init_state(lopt, params)
    with pytest.raises(ValueError, match="num_steps"):
        lopt_ext.fused_update(lopt, theta, bare, params=params, grads=params, value=1.0, impl="reference")
    with_h, _ = lopt_ext.fused_update(lopt, theta, bare, params=params, grads=params, value=1.0, impl="reference",
                                      num_steps=10)
    kept, _ = lopt_ext.fused_update(lopt, theta, state, params=params, grads=params, value=1.0, impl="reference")
    np.testing.assert_array_equal(with_h["w"], kept["w"])
    with pytest.raises(TypeError, match="loss_means"):  # a state from another rule's shape
        lopt_ext.fused_update(lopt, theta, state._replace(loss_means=jnp.zeros(3)), params=params, grads=params,
                              value=1.0, impl="reference")


@pytest.mark.parametrize("make", [lambda: lopt_ext.SmallFcLOpt(), lambda: lopt_ext.MLPLOpt(hidden_size=4)])
def test_other_rules_accept_and_ignore_loss_and_horizon(make):
    """GradientTransformationExtraArgs everywhere: value and num_steps change nothing for the
    rules that do not read them, and optax.chain passes them through."""
    lopt = make()
    theta = lopt.init_theta(jax.random.PRNGKey(1))
    params, grads = _inputs([(4, 3), (5,)], 3)
    plain = lopt.transform(theta, impl="reference")
    extra = optax.chain(lopt.transform(theta, impl="reference", num_steps=50), optax.scale(1.0))
    assert isinstance(plain, optax.GradientTransformationExtraArgs)
    u0, _ = plain.update(grads, plain.init(params), params)
    u1, _ = extra.update(grads, extra.init(params), params, value=jnp.float32(3.0))
    for k in params:
        np.testing.assert_array_equal(u0[k], u1[k])
    a, _ = lopt_ext.fused_update(lopt, theta, lopt_ext.init_state(lopt, params), params=params, grads=grads,
                                 impl="reference", value=1.0, num_steps=5)
    for k in params:
        np.testing.assert_array_equal(a[k], params[k] + u0[k])


@needs_theta
def test_skip_nonfinite_keeps_state_on_a_nan_loss_or_gradient():
    lopt, theta = _published()
    params, grads = _inputs([(4, 3), ()], 4)
    tx = lopt.transform(theta, impl="reference", num_steps=20, skip_nonfinite=True)
    state = tx.init(params)
    _, state = tx.update(grads, state, params, value=1.0)
    for value, g in ((jnp.nan, grads), (1.0, {**grads, "t1": jnp.float32(jnp.inf)})):
        u, new = tx.update(g, state, params, value=value)
        assert int(new.skipped) == int(state.skipped) + 1 and int(new.iteration) == int(state.iteration)
        for a, b in zip(jax.tree_util.tree_leaves(new._replace(skipped=0)),
                        jax.tree_util.tree_leaves(state._replace(skipped=0))):
            np.testing.assert_array_equal(a, b)
        assert all(np.all(np.asarray(x) == 0) for x in jax.tree_util.tree_leaves(u))


@needs_theta
def test_pretrained_load_celo(tmp_path, monkeypatch):
    lopt, theta = pretrained.load("celo", path=THETA_STATE)
    assert lopt == Celo() and theta["ff_mod_stack"]["~"]["w0__13"].shape == (1, 3, 4)
    # no path: the cache, else a clear error saying how to get the file (never the network here)
    monkeypatch.setenv("LOPT_EXT_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="huggingface-cli download amoudgl/celo"):
        pretrained.load("celo")
    (tmp_path / "celo").mkdir()
    (tmp_path / "celo" / "theta.state").write_bytes(open(THETA_STATE, "rb").read())
    _, cached = pretrained.load("celo")
    np.testing.assert_array_equal(cached["rnn_params"]["step_size"]["w"], theta["rnn_params"]["step_size"]["w"])
    with pytest.raises(ValueError, match="path"):
        pretrained.load("small_fc_lopt_h4", path=THETA_STATE)


@needs_theta
def test_bad_theta_files_give_clear_errors(tmp_path):
    import msgpack
    raw = open(THETA_STATE, "rb").read()
    cases = {"truncated": raw[: len(raw) // 2], "not_msgpack": b"\x00\x01hello world" * 10,
             "a_list": msgpack.packb([1, 2, 3])}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ValueError, match=name):
            load_theta_state(str(tmp_path / name))
    # a theta of another shape: the published tree with one weight cut
    tree = msgpack.unpackb(raw, strict_map_key=False)
    tree["rnn_params"]["step_size"]["b"] = msgpack.packb(([2], "float32", b"\x00" * 8))
    tree["rnn_params"]["step_size"]["b"] = msgpack.ExtType(1, tree["rnn_params"]["step_size"]["b"])
    (tmp_path / "shape").write_bytes(msgpack.packb(tree))
    with pytest.raises(ValueError, match=r"step_size.*shape"):
        load_theta_state(str(tmp_path / "shape"))
    with pytest.raises(FileNotFoundError, match="missing"):
        load_theta_state(str(tmp_path / "missing"))


@needs_theta
def test_evaluate_gives_celo_the_minibatch_loss_and_the_run_length():
    """evaluate's learned-optimizer run against a plain loop written here: each step's minibatch
    loss as value, the run's length as num_steps."""
    from lopt_ext import tasks
    from lopt_ext.metatrain import evaluate as ev
    lopt, theta = _published()
    task = tasks.get_task("mlp_wine_16_gelu_b64_s1_noise0.3")
    steps = 100
    held, _ = ev.run_curves(task, ev.lopt_tx_factory(lopt, theta, "reference", num_steps=steps), [0.0], [0], steps,
                            train_value=True)
    params, key = ev._init_run(task, 0)
    tx = lopt.transform(theta, impl="reference", num_steps=steps)
    state = tx.init(params)

    @jax.jit
    def step(params, state, i):
        loss, grads = jax.value_and_grad(task.loss)(params, task.sample_batch(jax.random.fold_in(key, i)))
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    for i in range(steps):
        params, state = step(params, state, i)
    np.testing.assert_allclose(held[0, 0, -1], task.eval_loss(params), rtol=1e-4)
    assert int(state.num_steps) == steps

"""MLPLOpt (LOLv2): the pure-JAX reference against a float64 transcription of the spec."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lopt_ext
from lopt_ext import MLPLOpt, checkpoint

TIMESCALES = np.array([1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000], np.float64)
DECAYS = np.array([0.1, 0.5, 0.9, 0.99, 0.999, 0.9999], np.float32).astype(np.float64)
SHAPES = [(), (1,), (7,), (5, 3), (4, 3, 2), (2, 1, 6), (3, 4, 5, 2)]


def numpy_step(theta, hidden_layers, it, p, g, m, exp_mult=1e-3, step_mult=1e-3):
    """shared/spec/mlp_lopt.md, loop by loop in float64."""
    shape = p.shape
    p, g, m = p.reshape(-1), g.reshape(-1), m.reshape(-1, 6)
    m = DECAYS * m + (1 - DECAYS) * g[:, None]
    feats = np.concatenate([g[:, None], p[:, None], m], axis=1)
    feats = feats / np.sqrt(1e-5 + np.mean(feats ** 2, axis=0, keepdims=True))
    t = np.tanh(it / TIMESCALES - 1)
    x = np.concatenate([feats, np.broadcast_to(t, (len(p), 11))], axis=1)
    for i in range(hidden_layers + 1):
        layer = theta[f"mlp/~/linear_{i}"]
        x = x @ np.asarray(layer["w"], np.float64) + np.asarray(layer["b"], np.float64)
        if i < hidden_layers:
            x = np.maximum(x, 0)
    step = x[:, 0] * np.exp(x[:, 1] * exp_mult) * step_mult
    return (p - step).reshape(shape), m.reshape(shape + (6,))


def _perturbed_theta(lopt, key, scale):
    theta = lopt.init_theta(key)
    leaves, tree = jax.tree_util.tree_flatten(theta)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_theta_layout_is_haikus_mlp():
    lopt = MLPLOpt(hidden_size=8, hidden_layers=3)
    theta = lopt.init_theta(jax.random.PRNGKey(0))
    assert sorted(theta) == [f"mlp/~/linear_{i}" for i in range(4)]
    assert theta["mlp/~/linear_0"]["w"].shape == (19, 8) and theta["mlp/~/linear_3"]["w"].shape == (8, 2)
    w = np.asarray(theta["mlp/~/linear_0"]["w"])
    assert np.all(np.abs(w) <= 2 / np.sqrt(19) + 1e-6) and 0.5 / np.sqrt(19) < w.std() < 1 / np.sqrt(19)
    assert all(np.all(np.asarray(theta[k]["b"]) == 0) for k in theta)


@pytest.mark.parametrize("scale,grad_scale", [(0.0, 1.0), (0.3, 1.0), (0.3, 1e-6)])
@pytest.mark.parametrize("hidden", [(32, 2), (4, 1)])
def test_reference_trajectories_match_float64_transcription(scale, grad_scale, hidden):
    lopt = MLPLOpt(hidden_size=hidden[0], hidden_layers=hidden[1])
    theta = _perturbed_theta(lopt, jax.random.PRNGKey(hidden[0]), scale)
    params = {str(i): jax.random.normal(jax.random.PRNGKey(10 + i), s) for i, s in enumerate(SHAPES)}
    tx = lopt.transform(theta, impl="reference")
    state = tx.init(params)
    update = jax.jit(tx.update)
    worst = {k: 0.0 for k in params}
    largest = {k: 0.0 for k in params}
    p = params
    for it in range(30):
        # each step of the float32 trajectory is checked against the float64 rule from the same
        # point (p, g, m before the step)
        g = {k: grad_scale * jnp.sin(3.0 * v + it) for k, v in p.items()}
        m_before = state.m
        u, state = update(g, state, p)
        p_new = jax.tree_util.tree_map(lambda a, b: a + b, p, u)
        for k in params:
            want_p, want_m = numpy_step(theta, lopt.hidden_layers, it, *(np.asarray(x[k], np.float64)
                                                                        for x in (p, g, m_before)))
            got = np.asarray(p_new[k], np.float64)
            largest[k] = max(largest[k], float(np.max(np.abs(want_p - np.asarray(p[k], np.float64)))))
            # the error in the step, against the step's scale (|p| >> |step| makes p itself uninformative)
            err = np.abs(got - want_p) - 1e-5 * np.abs(want_p - np.asarray(p[k], np.float64))
            worst[k] = max(worst[k], float(np.max(err)))
            np.testing.assert_allclose(np.asarray(state.m[k]), want_m, rtol=1e-5, atol=1e-6 * grad_scale)
        p = p_new
    for k, shp in zip(params, SHAPES):
        # float32 p - step rounds at |p| * 6e-8; scalars are normalised over one element (x -> sign(x))
        bound = 1e-6 * largest[k] + 2e-7 * float(np.max(np.abs(np.asarray(p[k])))) + 1e-9
        assert worst[k] <= (30 * bound if shp == () else bound), (shp, worst[k], bound)


def test_state_checks_and_optax_api():
    lopt = MLPLOpt(hidden_size=4)
    theta = lopt.init_theta(jax.random.PRNGKey(0))
    params = {"w": jnp.ones((3, 2), jnp.bfloat16), "b": jnp.zeros(2)}
    state = lopt_ext.init_state(lopt, params)
    assert isinstance(state, lopt_ext.MLPLOptState) and state.m["w"].shape == (3, 2, 6)
    assert state.m["w"].dtype == jnp.float32
    tx = lopt.transform(theta, impl="reference")
    u, st = tx.update({"w": jnp.ones((3, 2), jnp.bfloat16), "b": jnp.ones(2)}, state, params)
    assert u["w"].dtype == jnp.bfloat16 and int(st.iteration) == 1
    with pytest.raises(ValueError, match=r"state\.m\['w'\]"):
        tx.update(params, lopt_ext.init_state(lopt, {"w": jnp.ones((2, 3)), "b": jnp.zeros(2)}), params)
    with pytest.raises(TypeError, match="MLPLOptState"):
        tx.update(params, lopt_ext.init_state(lopt_ext.SmallFcLOpt(), params), params)
    with pytest.raises(ValueError, match="linear_0"):
        MLPLOpt(hidden_size=8).transform(theta)
    with pytest.raises(NotImplementedError, match="reference"):
        lopt.transform(theta, impl="fused").update(params, state, params)
    with pytest.raises(ValueError, match="hidden_size"):
        MLPLOpt(hidden_size=0)


def test_checkpoint_round_trip(tmp_path):
    lopt = MLPLOpt(hidden_size=8, hidden_layers=1)
    theta = _perturbed_theta(lopt, jax.random.PRNGKey(3), 0.1)
    path = str(tmp_path / "m.safetensors")
    checkpoint.save_theta(path, theta, lopt)
    lopt2, theta2 = checkpoint.load_theta(path)
    assert lopt2 == lopt and sorted(theta2) == sorted(theta)
    for k in theta:
        np.testing.assert_array_equal(theta[k]["w"], theta2[k]["w"])

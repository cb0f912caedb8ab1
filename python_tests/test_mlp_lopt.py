"""MLPLOpt (LOLv2): the pure-JAX reference and the fused CPU kernel against a float64
transcription of the spec, and against each other."""
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


needs_kernels = pytest.mark.skipif(not lopt_ext.kernels_available(), reason="compiled kernels not built")
IMPLS = ["reference", pytest.param("fused", marks=needs_kernels)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scale,grad_scale", [(0.0, 1.0), (0.3, 1.0), (0.3, 1e-6)])
@pytest.mark.parametrize("hidden", [(32, 2), (4, 1), (7, 3)])
def test_trajectories_match_float64_transcription(scale, grad_scale, hidden, impl):
    lopt = MLPLOpt(hidden_size=hidden[0], hidden_layers=hidden[1])
    theta = _perturbed_theta(lopt, jax.random.PRNGKey(hidden[0]), scale)
    params = {str(i): jax.random.normal(jax.random.PRNGKey(10 + i), s) for i, s in enumerate(SHAPES)}
    tx = lopt.transform(theta, impl=impl)
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


def _random_problem(lopt, key, shapes, grad_scale=1.0):
    keys = jax.random.split(key, 3 * len(shapes))
    params = {str(i): jax.random.normal(keys[3 * i], s) for i, s in enumerate(shapes)}
    grads = {str(i): grad_scale * jax.random.normal(keys[3 * i + 1], s) for i, s in enumerate(shapes)}
    state = lopt_ext.init_state(lopt, params)
    state = state._replace(iteration=jnp.int32(17), m={
        str(i): 0.1 * jax.random.normal(keys[3 * i + 2], tuple(s) + (6,)) for i, s in enumerate(shapes)})
    return params, grads, state


def _assert_close(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    tol = 1e-6 * np.max(np.abs(b)) + 1e-5 * np.abs(b)
    assert np.all(np.abs(a - b) <= tol), (what, float(np.max(np.abs(a - b) - tol)))


@needs_kernels
@pytest.mark.parametrize("shapes", [[(33000,)], [(129, 257), (3,), ()], [(2, 3, 40000)]])
def test_fused_matches_reference_on_large_tensors_and_updates_mode(shapes):
    """Tensors spanning several kernel chunks (16384 elements); the optax path (write_delta)
    and fused_update (new params) against the reference, per element."""
    lopt = MLPLOpt(hidden_size=16, hidden_layers=2)
    theta = _perturbed_theta(lopt, jax.random.PRNGKey(4), 0.2)
    params, grads, state = _random_problem(lopt, jax.random.PRNGKey(5), shapes)
    ref_p, ref_s = lopt_ext.fused_update(lopt, theta, state, params=params, grads=grads, impl="reference")
    got_p, got_s = jax.jit(lambda s, p, g: lopt_ext.fused_update(lopt, theta, s, params=p, grads=g))(
        state, params, grads)
    tx_f, tx_r = lopt.transform(theta, impl="fused"), lopt.transform(theta, impl="reference")
    u_f, _ = jax.jit(tx_f.update)(grads, state, params)
    u_r, _ = tx_r.update(grads, state, params)
    for k in params:
        _assert_close(got_s.m[k], ref_s.m[k], f"m {k}")
        _assert_close(got_p[k], ref_p[k], f"params {k}")
        _assert_close(u_f[k], u_r[k], f"update (-step) {k}")


@needs_kernels
def test_fused_under_vmap_matches_per_member_calls():
    """A population (vmap over theta, params, grads and state) gives each member's own step."""
    lopt = MLPLOpt(hidden_size=8, hidden_layers=2)
    thetas = [_perturbed_theta(lopt, jax.random.PRNGKey(20 + i), 0.3) for i in range(3)]
    probs = [_random_problem(lopt, jax.random.PRNGKey(30 + i), [(6, 5), (5,)]) for i in range(3)]
    stack = lambda xs: jax.tree_util.tree_map(lambda *a: jnp.stack(a), *xs)
    step = lambda th, s, p, g: lopt.transform(th, impl="fused").update(g, s, p)
    vu, vs = jax.jit(jax.vmap(step))(stack(thetas), stack([s for _, _, s in probs]),
                                     stack([p for p, _, _ in probs]), stack([g for _, g, _ in probs]))
    for i, (p, g, s) in enumerate(probs):
        ru, rs = lopt.transform(thetas[i], impl="reference").update(g, s, p)
        for k in p:
            _assert_close(vu[k][i], ru[k], k)
            _assert_close(vs.m[k][i], rs.m[k], k)


@needs_kernels
def test_fused_is_deterministic_and_rejects_bad_theta():
    lopt = MLPLOpt(hidden_size=8)
    theta = _perturbed_theta(lopt, jax.random.PRNGKey(1), 0.3)
    params, grads, state = _random_problem(lopt, jax.random.PRNGKey(2), [(300, 70)])
    f = jax.jit(lambda s, p, g: lopt_ext.fused_update(lopt, theta, s, params=p, grads=g))
    a, b = f(state, params, grads), f(state, params, grads)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    bad = dict(theta, **{"mlp/~/linear_1": {"w": theta["mlp/~/linear_1"]["w"][:, :3],
                                              "b": theta["mlp/~/linear_1"]["b"]}})
    with pytest.raises(ValueError, match="linear_1"):
        lopt_ext.fused_update(lopt, bad, state, params=params, grads=grads)


LO_DATA = __import__("os").path.join(__import__("os").path.dirname(__file__), "data", "lo_mlp_lopt_trajectories.npz")


def _lo_cases():
    data = np.load(LO_DATA)
    return data, sorted({k.split("/")[0] for k in data.files if k.startswith("case")})


@pytest.mark.parametrize("impl", IMPLS)
def test_trajectories_match_learned_optimizations_own_mlp_lopt(impl):
    """30-step trajectories recorded from learned_optimization's MLPLOpt code
    (tools/lo_mlp_lopt_trajectories.py): hidden 32x2 and 4x1, init and perturbed theta,
    gradients of scale 1 and 1e-6, ranks 0-4. Per element |a - b| <= 1e-6 max|b| + 1e-5 |b|
    for the params after every step and the momenta at the recorded steps."""
    data, cases = _lo_cases()
    m_steps = list(data["m_steps"])
    assert len(cases) >= 5
    for case in cases:
        hidden, layers, _, _ = data[f"{case}/config"]
        lopt = MLPLOpt(hidden_size=int(hidden), hidden_layers=int(layers))
        theta = {}
        for key in data.files:
            if key.startswith(f"{case}/theta/"):
                lname, wname = key[len(f"{case}/theta/"):].rsplit("/", 1)
                theta.setdefault(lname, {})[wname] = jnp.asarray(data[key])
        names = sorted({k.split("/")[-1] for k in data.files if k.startswith(f"{case}/p0/")})
        params = {k: jnp.asarray(data[f"{case}/p0/{k}"]) for k in names}
        tx = lopt.transform(theta, impl=impl)
        update = jax.jit(tx.update)
        state = tx.init(params)
        for t in range(data[f"{case}/p/{names[0]}"].shape[0]):
            grads = {k: jnp.asarray(data[f"{case}/grads/{k}"][t]) for k in names}
            u, state = update(grads, state, params)
            params = jax.tree_util.tree_map(lambda a, b: a + b, params, u)
            for k in names:
                _assert_close(params[k], data[f"{case}/p/{k}"][t], f"{case} step {t} params {k}")
                if t in m_steps:
                    _assert_close(state.m[k], data[f"{case}/m/{k}"][m_steps.index(t)], f"{case} step {t} m {k}")

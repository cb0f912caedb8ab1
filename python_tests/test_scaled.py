"""ScaledSmallFcLOpt: small_fc_lopt times a learned per-tensor step scale."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lopt_ext
from lopt_ext import ScaledSmallFcLOpt, SmallFcLOpt, checkpoint
from lopt_ext.common import STEP_TIMESCALES

SHAPES = {"w": (6, 4), "b": (4,), "s": (), "t": (3, 2, 5)}


def _tree(key, scale=1.0):
    keys = jax.random.split(key, len(SHAPES))
    return {k: scale * jax.random.normal(kk, shp, jnp.float32) for (k, shp), kk in zip(SHAPES.items(), keys)}


def _random_scale_theta(lopt, key):
    theta = lopt.init_theta(key)
    n, h = lopt.num_scale_inputs, lopt.scale_hidden
    k1, k2 = jax.random.split(jax.random.fold_in(key, 7))
    theta["tensor_scale"]["w_lin"] = 0.5 * jax.random.normal(k1, (n,))
    theta["tensor_scale"]["w2"] = 0.5 * jax.random.normal(k2, (h,))
    theta["tensor_scale"]["b"] = jnp.asarray([0.3])
    if lopt.progress_inputs:  # the learned weight decay on, lambda ~ 1e-3
        theta["tensor_scale"]["decay_w"] = jnp.asarray([0.5, -0.7])
        theta["tensor_scale"]["decay_b"] = jnp.asarray([np.log(1e-3)])
    return theta


def _trajectory(lopt, theta, params, impl, steps, grads_at, num_steps=None):
    """Final params after ``steps`` jitted optax steps with gradients grads_at(i, params)."""
    tx = lopt.transform(theta, impl=impl, num_steps=num_steps)
    p, st = params, tx.init(params)
    upd = jax.jit(tx.update)
    for i in range(steps):
        u, st = upd(grads_at(i, p), st, p)
        p = jax.tree_util.tree_map(jnp.add, p, u)
    return p


def _assert_fused_matches_reference(lopt, theta, params, steps, grads_at, num_steps=None):
    fused, ref = (_trajectory(lopt, theta, params, impl, steps, grads_at, num_steps) for impl in ("fused", "reference"))
    for k in SHAPES:
        a, b = np.asarray(fused[k]), np.asarray(ref[k])
        assert np.all(np.abs(a - b) <= 1e-6 * np.max(np.abs(b)) + 1e-5 * np.abs(b)), k


def test_fresh_theta_is_exactly_small_fc_lopt():
    lopt = ScaledSmallFcLOpt(hidden_size=4)
    theta = lopt.init_theta(jax.random.PRNGKey(0))
    base = SmallFcLOpt(hidden_size=4)
    base_theta = {k: v for k, v in theta.items() if k != "tensor_scale"}
    params, grads = _tree(jax.random.PRNGKey(1)), _tree(jax.random.PRNGKey(2), 0.1)
    for impl in ("fused", "reference"):
        a, sa = lopt_ext.fused_update(lopt, theta, lopt_ext.init_state(lopt, params), params=params, grads=grads, impl=impl)
        b, sb = lopt_ext.fused_update(base, base_theta, lopt_ext.init_state(base, params), params=params, grads=grads,
                                      impl=impl)
        for k in SHAPES:
            np.testing.assert_array_equal(a[k], b[k])


def _numpy_scale(lopt, theta, iteration, p, g, m, rms, extra=()):
    """Independent float64 transcription of the scale rule in the module docstring; extra: inputs
    appended to u (the horizon inputs)."""
    p, g, m, rms = (np.asarray(x, np.float64) for x in (p, g, m, rms))
    mom_b, rms_b, _ = (np.asarray(x, np.float64) for x in lopt.decays(theta))
    c = np.clip(rms_b, 0, 1)
    dm = m.shape[-1]
    g1 = g.reshape(-1, 1)
    m_new = m.reshape(-1, dm) * mom_b + (1 - mom_b) * g1
    rms_new = rms.reshape(-1, rms.shape[-1]) * c + (1 - c) * g1 ** 2
    snr = np.clip(0.5 * np.log((m_new ** 2).mean(0) + 1e-30) - 0.5 * np.log(rms_new.mean() + 1e-30), -10, 3)
    u = np.concatenate([[0.5 * np.log((p ** 2).mean() + 1e-6) / 3], snr / 3, [np.log(max(p.size, 1)) / 10],
                        np.tanh(iteration / np.asarray(STEP_TIMESCALES, np.float64) - 1), extra])
    t = {k: np.asarray(v, np.float64) for k, v in theta["tensor_scale"].items()}
    z = u @ t["w_lin"] + t["b"][0] + np.maximum(u @ t["w1"] + t["b1"], 0) @ t["w2"]
    return np.exp(4 * np.tanh(z / 4))


def test_scale_matches_an_independent_transcription():
    lopt = ScaledSmallFcLOpt(hidden_size=4)
    theta = _random_scale_theta(lopt, jax.random.PRNGKey(3))
    for it in (0, 7, 250):
        for shp in SHAPES.values():
            ks = jax.random.split(jax.random.PRNGKey(it + len(shp)), 4)
            p, g = jax.random.normal(ks[0], shp), 0.01 * jax.random.normal(ks[1], shp)
            m = 0.01 * jax.random.normal(ks[2], shp + (3,))
            rms = 1e-4 * jnp.abs(jax.random.normal(ks[3], shp + (1,)))
            got = float(lopt.tensor_scale(theta, jnp.int32(it), p, g, m, rms))
            want = _numpy_scale(lopt, theta, it, p, g, m, rms)
            np.testing.assert_allclose(got, want, rtol=2e-5)
            assert np.exp(-4) <= got <= np.exp(4)


def test_scale_is_invariant_to_the_loss_scale():
    lopt = ScaledSmallFcLOpt(hidden_size=4)
    theta = _random_scale_theta(lopt, jax.random.PRNGKey(4))
    p, g = jax.random.normal(jax.random.PRNGKey(5), (8, 3)), jax.random.normal(jax.random.PRNGKey(6), (8, 3))
    m, rms = 0.1 * g[..., None] * jnp.ones(3), 0.01 * (g * g)[..., None]
    s1 = lopt.tensor_scale(theta, jnp.int32(5), p, g, m, rms)
    s2 = lopt.tensor_scale(theta, jnp.int32(5), p, 1e3 * g, 1e3 * m, 1e6 * rms)
    np.testing.assert_allclose(float(s1), float(s2), rtol=1e-5)


@pytest.mark.parametrize("kernel_sums", [False, True])
def test_fused_matches_reference_over_a_trajectory(kernel_sums, monkeypatch):
    from lopt_ext import scaled
    if kernel_sums:  # these small tensors through the kernel's scale sums too
        monkeypatch.setattr(scaled, "FUSED_SUMS_MIN_ELEMENTS", 0)
    lopt = ScaledSmallFcLOpt(hidden_size=4)
    theta = _random_scale_theta(lopt, jax.random.PRNGKey(8))
    _assert_fused_matches_reference(lopt, theta, _tree(jax.random.PRNGKey(9)), 20,
                                    lambda i, p: jax.tree_util.tree_map(lambda x: 0.1 * x + 0.01 * jnp.sin(i + x), p))


def test_scaled_steps_differ_from_plain_ones_by_the_scale():
    lopt = ScaledSmallFcLOpt(hidden_size=4)
    theta = _random_scale_theta(lopt, jax.random.PRNGKey(10))
    base = SmallFcLOpt(hidden_size=4)
    base_theta = {k: v for k, v in theta.items() if k != "tensor_scale"}
    params, grads = _tree(jax.random.PRNGKey(11)), _tree(jax.random.PRNGKey(12), 0.1)
    st = lopt_ext.init_state(lopt, params)
    u, _ = lopt.transform(theta, impl="reference").update(grads, st, params)
    ub, _ = base.transform(base_theta, impl="reference").update(grads, st, params)
    for k in SHAPES:
        s = lopt.tensor_scale(theta, jnp.int32(0), params[k], grads[k], st.m[k], st.rms[k])
        np.testing.assert_allclose(np.asarray(u[k]), float(s) * np.asarray(ub[k]), rtol=1e-6, atol=1e-12)


def test_checkpoint_round_trip_keeps_the_kind(tmp_path):
    lopt = ScaledSmallFcLOpt(hidden_size=4, scale_hidden=5)
    theta = _random_scale_theta(lopt, jax.random.PRNGKey(13))
    path = str(tmp_path / "t.safetensors")
    checkpoint.save_theta(path, theta, lopt)
    lopt2, theta2 = checkpoint.load_theta(path)
    assert lopt2 == lopt and type(lopt2) is ScaledSmallFcLOpt
    for a, b in zip(jax.tree_util.tree_leaves(theta), jax.tree_util.tree_leaves(theta2)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="tensor_scale"):
        checkpoint.load_theta(path, SmallFcLOpt(hidden_size=4))


def test_bad_configuration_and_theta():
    with pytest.raises(ValueError, match="scale_hidden"):
        ScaledSmallFcLOpt(scale_hidden=0)
    lopt = ScaledSmallFcLOpt(hidden_size=4)
    theta = lopt.init_theta(jax.random.PRNGKey(0))
    del theta["tensor_scale"]
    with pytest.raises(ValueError, match="tensor_scale"):
        lopt.transform(theta)


def test_sharded_path_takes_the_scaled_rule_and_refuses_the_progress_variant():
    """On a one-device mesh the sharded path equals fused_update (every tensor is whole there;
    the sharded statistics run in python_tests/sharded_cases.py on 8 host devices)."""
    from jax.sharding import Mesh, PartitionSpec as P
    from lopt_ext import sharded
    lopt = ScaledSmallFcLOpt(hidden_size=4)
    theta = _random_scale_theta(lopt, jax.random.PRNGKey(14))
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("d",))
    params, grads = _tree(jax.random.PRNGKey(15)), _tree(jax.random.PRNGKey(16), 0.1)
    st = lopt_ext.init_state(lopt, params)
    want, _ = lopt_ext.fused_update(lopt, theta, st, params=params, grads=grads)
    got, _ = sharded.sharded_update(lopt, theta, st, params, grads, mesh=mesh, param_specs=P())
    for k in SHAPES:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6, atol=1e-7)
    progress = ScaledSmallFcLOpt(hidden_size=4, progress_inputs=True)
    with pytest.raises(NotImplementedError, match="progress_inputs"):
        sharded.sharded_transform(progress, progress.init_theta(jax.random.PRNGKey(0)), mesh=mesh, param_specs=P())


# ----- progress inputs (how far each tensor has come since its first step)
def _grads_at(i, p):
    return jax.tree_util.tree_map(lambda x: 0.1 * x * (0.97 ** i) + 0.01 * jnp.sin(i + x), p)


def test_progress_variant_starts_as_the_rule_it_extends():
    from lopt_ext.scaled import with_progress_inputs
    lopt = ScaledSmallFcLOpt(hidden_size=4)
    theta = _random_scale_theta(lopt, jax.random.PRNGKey(20))
    lp, tp = with_progress_inputs(lopt, theta)
    assert lp.progress_inputs and lp.num_scale_inputs == lopt.num_scale_inputs + 2
    params = _tree(jax.random.PRNGKey(21))
    for impl in ("fused", "reference"):
        a, b = (_trajectory(l, t, params, impl, 12, _grads_at) for l, t in ((lopt, theta), (lp, tp)))
        for k in SHAPES:
            np.testing.assert_array_equal(a[k], b[k])


def _numpy_progress(p, p0, g0, ema, beta, count):
    """Independent float64 transcription: log RMS(p)/RMS(p0) and log(RMS_fast(g)/RMS(g0))/3,
    RMS_fast^2 = the test's own bias-corrected EMA of mean(g^2)."""
    lr = lambda x, eps: 0.5 * np.log(np.mean(np.square(np.asarray(x, np.float64))) + eps)
    grew = np.clip(lr(p, 1e-6) - lr(p0, 1e-6), -5, 5) if np.any(np.asarray(p0) != 0) else 0.0
    fell = np.clip(0.5 * np.log(ema / (1 - beta ** count) + 1e-30) - lr(g0, 1e-30), -12, 3)
    return np.array([grew, fell / 3])


def test_progress_inputs_match_an_independent_transcription():
    lopt = ScaledSmallFcLOpt(hidden_size=4, progress_inputs=True)
    theta = _random_scale_theta(lopt, jax.random.PRNGKey(22))
    beta = float(np.clip(np.asarray(lopt.decays(theta)[2], np.float64)[0], 0, 1))
    params = dict(_tree(jax.random.PRNGKey(23)), z=jnp.zeros((3,)))  # z: a zero-initialised bias
    p, st = params, lopt_ext.init_state(lopt, params)
    g0 = _grads_at(0, p)
    ema = {k: 0.0 for k in params}
    for i in range(15):
        g = _grads_at(i, p)
        leaves = [(p[k], g[k], *(getattr(st, f)[k] for f in lopt.state_fields)) for k in params]
        new = [res[1:] for res in lopt.reference_leaves(theta, st.iteration, leaves)]
        for k, leaf, n in zip(params, leaves, new):
            ema[k] = beta * ema[k] + (1 - beta) * float(np.mean(np.square(np.asarray(g[k], np.float64))))
            got = np.asarray(lopt.progress_inputs_new(theta, st.iteration, leaf[0], n))
            want = _numpy_progress(p[k], params[k], g0[k], ema[k], beta, i + 1)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"{k} step {i}")
        u, st = lopt.transform(theta, impl="reference").update(g, st, p)
        p = jax.tree_util.tree_map(jnp.add, p, u)


def test_progress_reference_is_kept_and_set_by_the_first_applied_step():
    lopt = ScaledSmallFcLOpt(hidden_size=4, progress_inputs=True)
    theta = _random_scale_theta(lopt, jax.random.PRNGKey(24))
    params = _tree(jax.random.PRNGKey(25))
    st = lopt_ext.init_state(lopt, params)
    assert type(st).__name__ == "ScaledSmallFcLOptState" and st.scale_ref["w"].shape == (2,)
    tx = lopt.transform(theta, skip_nonfinite=True)
    bad = jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), params)
    _, st = tx.update(bad, st, params)  # skipped: no reference yet
    assert int(st.iteration) == 0 and all(np.all(np.asarray(r) == 0) for r in st.scale_ref.values())
    g0 = _grads_at(0, params)
    u, st = tx.update(g0, st, params)
    p = jax.tree_util.tree_map(jnp.add, params, u)
    first = {k: np.asarray(v) for k, v in st.scale_ref.items()}
    for k in SHAPES:
        rms = lambda x: 0.5 * np.log(np.mean(np.square(np.asarray(x, np.float64))))
        np.testing.assert_allclose(first[k], [rms(params[k]), rms(g0[k])], rtol=1e-5, atol=1e-5)
    for i in range(1, 4):
        u, st = tx.update(_grads_at(i, p), st, p)
        p = jax.tree_util.tree_map(jnp.add, p, u)
    for k in SHAPES:
        np.testing.assert_array_equal(np.asarray(st.scale_ref[k]), first[k])


def test_progress_fused_matches_reference_and_checkpoints_keep_the_flag(tmp_path):
    lopt = ScaledSmallFcLOpt(hidden_size=4, progress_inputs=True)
    theta = _random_scale_theta(lopt, jax.random.PRNGKey(26))
    params = _tree(jax.random.PRNGKey(27))
    _assert_fused_matches_reference(lopt, theta, params, 20, _grads_at)
    path = str(tmp_path / "p.safetensors")
    checkpoint.save_theta(path, theta, lopt)
    lopt2, _ = checkpoint.load_theta(path)
    assert lopt2 == lopt and lopt2.progress_inputs
    with pytest.raises(TypeError, match="progress_inputs"):
        ScaledSmallFcLOpt(progress_inputs=1)
    with pytest.raises(ValueError, match="step_scales"):
        lopt.tensor_scale(theta, jnp.int32(0), params["w"], params["w"], jnp.zeros((6, 4, 3)), jnp.zeros((6, 4, 1)))


def test_learned_decay_adds_scale_times_lambda_times_p_to_the_scaled_step():
    lopt = ScaledSmallFcLOpt(hidden_size=4, progress_inputs=True)
    theta = _random_scale_theta(lopt, jax.random.PRNGKey(28))
    off = dict(theta, tensor_scale=dict(theta["tensor_scale"], decay_b=jnp.asarray([-30.0])))
    params = _tree(jax.random.PRNGKey(29))
    g0 = _grads_at(0, params)
    beta = float(np.clip(np.asarray(lopt.decays(theta)[2], np.float64)[0], 0, 1))
    st = lopt_ext.init_state(lopt, params)
    p, ema = params, {k: 0.0 for k in SHAPES}
    # the plain small_fc_lopt step of the same state: u_off = s * u_plain gives the scale s
    base = SmallFcLOpt(hidden_size=4)
    base_theta = {k: v for k, v in theta.items() if k != "tensor_scale"}
    for i in range(6):
        g = _grads_at(i, p)
        u_on, st_on = lopt.transform(theta, impl="reference").update(g, st, p)
        u_off, _ = lopt.transform(off, impl="reference").update(g, st, p)
        plain_state = lopt_ext.SmallFcLOptState(*st[:7])
        u_plain, _ = base.transform(base_theta, impl="reference").update(g, plain_state, p)
        for k in SHAPES:
            ema[k] = beta * ema[k] + (1 - beta) * float(np.mean(np.square(np.asarray(g[k], np.float64))))
            prog = _numpy_progress(p[k], params[k], g0[k], ema[k], beta, i + 1)
            lam = min(np.exp(np.log(1e-3) + prog @ np.array([0.5, -0.7])), 0.1)
            a, b = np.asarray(u_off[k], np.float64), np.asarray(u_plain[k], np.float64)
            s = np.sum(a * b) / np.sum(b * b)
            np.testing.assert_allclose(np.asarray(u_on[k]), a - s * lam * np.asarray(p[k]),
                                       rtol=1e-4, atol=1e-7, err_msg=f"{k} step {i}")
        st, p = st_on, jax.tree_util.tree_map(jnp.add, p, u_on)
    fresh = ScaledSmallFcLOpt(hidden_size=4, progress_inputs=True).init_theta(jax.random.PRNGKey(0))
    assert float(fresh["tensor_scale"]["decay_b"][0]) <= -30.0  # off: a fresh theta does not decay


def _sums64(p, m, rms):
    p, m, rms = (np.asarray(x, np.float64) for x in (p, m, rms))
    return np.concatenate([[np.sum(p * p)], np.sum(m.reshape(-1, m.shape[-1]) ** 2, axis=0), [np.sum(rms)]])


@pytest.mark.parametrize("dm, dr", [(3, 1), (1, 1), (2, 2), (5, 1)])
def test_kernel_scale_sums_match_float64_sums(dm, dr):
    """The CPU kernel's threaded sums (the fused step's, from FUSED_SUMS_MIN_ELEMENTS elements)
    against numpy in float64: shapes with tails that fill no lane block, a scalar, several
    chunks of the kernel's task split, and a vmapped population."""
    from lopt_ext import scaled
    decays = (0.5, 0.9, 0.99, 0.999, 0.9999)[:dm]
    lopt = ScaledSmallFcLOpt(hidden_size=4, initial_momentum_decays=decays, initial_adafactor_decays=decays,
                             initial_rms_decays=(0.999, 0.9)[:dr])
    shapes = [(300, 401), (), (7,), (2, 3, 23), (2 * 65536 + 13,)]
    keys = jax.random.split(jax.random.PRNGKey(dm + 10 * dr), 3 * len(shapes))
    items = [(jax.random.normal(keys[3 * i], s), jax.random.normal(keys[3 * i + 1], s + (dm,)),
              jax.random.uniform(keys[3 * i + 2], s + (dr,))) for i, s in enumerate(shapes)]
    assert sum(int(np.prod(s)) for s in shapes) >= scaled.FUSED_SUMS_MIN_ELEMENTS
    fn = jax.jit(lambda it: lopt.scale_sums_leaves(it, "fused"))
    assert "lopt_scale_sums" in fn.lower(items).as_text()
    for it, got in zip(items, fn(items)):
        np.testing.assert_allclose(np.asarray(got), _sums64(*it), rtol=2e-6)
    pop = [(jnp.stack([p, 2 * p]), jnp.stack([m, -3 * m]), jnp.stack([r, 0.5 * r])) for p, m, r in items]
    for it, got in zip(pop, jax.jit(jax.vmap(lambda it: lopt.scale_sums_leaves(it, "fused")))(pop)):
        for b in range(2):
            np.testing.assert_allclose(np.asarray(got[b]), _sums64(*(x[b] for x in it)), rtol=2e-6)


def test_kernel_scale_sums_only_for_large_fused_steps_and_bad_operands_raise():
    from lopt_ext import _ffi, scaled
    lopt = ScaledSmallFcLOpt(hidden_size=4)
    small = [(jnp.ones((4, 5)), jnp.ones((4, 5, 3)), jnp.ones((4, 5, 1)))]
    assert "lopt_scale_sums" not in jax.jit(lambda it: lopt.scale_sums_leaves(it, "fused")).lower(small).as_text()
    big = [(jnp.ones((300, 300)), jnp.ones((300, 300, 3)), jnp.ones((300, 300, 1)))]
    assert "lopt_scale_sums" not in jax.jit(lambda it: lopt.scale_sums_leaves(it, "reference")).lower(big).as_text()
    with pytest.raises(Exception, match="momentum: expected float32"):
        _ffi.scale_sums([(jnp.ones((300, 300)), jnp.ones((300, 300, 2)), jnp.ones((300, 300, 1)))], 3, 1,
                        lopt.scale_sums)[0].block_until_ready()
    assert scaled.FUSED_SUMS_MIN_ELEMENTS <= 300 * 300


def test_fused_default_step_with_kernel_sums_matches_reference_on_a_large_tensor():
    """A tensor above FUSED_SUMS_MIN_ELEMENTS: the fused step's scale comes from the kernel's
    sums, the reference's from XLA's; 5 steps of the shipped rule agree."""
    from lopt_ext import pretrained
    lopt, theta = pretrained.load()
    params = {"w": jax.random.normal(jax.random.PRNGKey(3), (300, 301)), "b": jnp.zeros((301,))}
    grads_at = lambda i, p: jax.tree_util.tree_map(lambda x: 0.1 * x + 0.01 * jnp.sin(i + 3 * x) + 0.001, p)
    fused, ref = (_trajectory(lopt, theta, params, impl, 5, grads_at) for impl in ("fused", "reference"))
    for k in params:
        a, b = np.asarray(fused[k]), np.asarray(ref[k])
        assert np.all(np.abs(a - b) <= 1e-6 * np.max(np.abs(b)) + 1e-5 * np.abs(b)), k


# ----- horizon inputs (where the run stands in its num_steps)
def _numpy_horizon(iteration, num_steps):
    f = iteration / num_steps
    cosine = 0.5 * (1 + np.cos(np.pi * min(f, 1.0)))
    return np.concatenate([np.tanh(10 * (f - np.array([0.1, 0.25, 0.5, 0.75, 0.9]))), [np.log(cosine + 1e-3) / 7]])


def test_horizon_variant_starts_as_the_rule_it_extends_in_either_order():
    from lopt_ext.scaled import with_horizon_inputs, with_progress_inputs
    lopt = ScaledSmallFcLOpt(hidden_size=4)
    theta = _random_scale_theta(lopt, jax.random.PRNGKey(40))
    lh, th = with_horizon_inputs(lopt, theta)
    assert lh.horizon_inputs and lh.uses_horizon and lh.num_scale_inputs == lopt.num_scale_inputs + 6
    params = _tree(jax.random.PRNGKey(41))
    for impl in ("fused", "reference"):
        a = _trajectory(lopt, theta, params, impl, 12, _grads_at)
        b = _trajectory(lh, th, params, impl, 12, _grads_at, num_steps=20)
        for k in SHAPES:
            np.testing.assert_array_equal(a[k], b[k])
    # progress then horizon, or horizon then progress: the same rule and the same theta layout
    l1, t1 = with_horizon_inputs(*with_progress_inputs(lopt, theta))
    l2, t2 = with_progress_inputs(lh, th)
    assert l1 == l2 and l1.progress_inputs and l1.horizon_inputs
    for a, b in zip(jax.tree_util.tree_leaves(t1), jax.tree_util.tree_leaves(t2)):
        np.testing.assert_array_equal(a, b)


def test_horizon_scale_matches_an_independent_transcription():
    """The scaled step is the plain small_fc_lopt step times the float64 transcription's scale,
    whose u ends with the horizon inputs of iteration / num_steps (at steps before, across and
    after the horizon)."""
    lopt = ScaledSmallFcLOpt(hidden_size=4, horizon_inputs=True)
    theta = _random_scale_theta(lopt, jax.random.PRNGKey(42))
    theta["tensor_scale"]["w_lin"] = theta["tensor_scale"]["w_lin"].at[-6:].set(jnp.asarray([0.8, -0.5, 1.2, -1.0, 0.6, 2.0]))
    base = SmallFcLOpt(hidden_size=4)
    base_theta = {k: v for k, v in theta.items() if k != "tensor_scale"}
    params, grads = _tree(jax.random.PRNGKey(43)), _tree(jax.random.PRNGKey(44), 0.1)
    for it in (0, 7, 19, 40):
        st = lopt_ext.init_state(lopt, params, num_steps=20)._replace(iteration=jnp.int32(it))
        u, st2 = lopt.transform(theta, impl="reference", num_steps=20).update(grads, st, params)
        assert int(st2.num_steps) == 20
        ub, _ = base.transform(base_theta, impl="reference").update(grads, lopt_ext.init_state(base, params)._replace(
            iteration=jnp.int32(it)), params)
        for k in SHAPES:
            s = _numpy_scale(lopt, theta, it, params[k], grads[k], st.m[k], st.rms[k], _numpy_horizon(it, 20))
            np.testing.assert_allclose(np.asarray(u[k]), s * np.asarray(ub[k]), rtol=2e-5, atol=1e-9,
                                       err_msg=f"{k} step {it}")


def test_horizon_rule_needs_num_steps_keeps_it_and_fused_matches_reference(tmp_path):
    from jax.sharding import Mesh, PartitionSpec as P
    from lopt_ext import sharded
    from lopt_ext.scaled import ScaledHorizonState, ScaledProgressHorizonState
    lopt = ScaledSmallFcLOpt(hidden_size=4, horizon_inputs=True)
    theta = _random_scale_theta(lopt, jax.random.PRNGKey(45))
    params = _tree(jax.random.PRNGKey(46))
    with pytest.raises(ValueError, match="num_steps"):
        lopt.transform(theta)
    st = lopt_ext.init_state(lopt, params, num_steps=30)
    assert isinstance(st, ScaledHorizonState) and int(st.num_steps) == 30
    assert isinstance(lopt_ext.init_state(ScaledSmallFcLOpt(progress_inputs=True, horizon_inputs=True), params),
                      ScaledProgressHorizonState)
    with pytest.raises(ValueError, match="num_steps"):  # a state without a horizon, and none passed
        lopt_ext.fused_update(lopt, theta, lopt_ext.init_state(lopt, params), params=params, grads=params)
    # the horizon a call passes is the one the step reads (and keeps); at step 5 of 30 or of 3
    g, at5 = _grads_at(0, params), lambda s: s._replace(iteration=jnp.int32(5))
    a, sa = lopt_ext.fused_update(lopt, theta, at5(lopt_ext.init_state(lopt, params)), params=params, grads=g,
                                  num_steps=30)
    b, _ = lopt_ext.fused_update(lopt, theta, at5(st), params=params, grads=g)
    c, _ = lopt_ext.fused_update(lopt, theta, at5(st), params=params, grads=g, num_steps=3)
    assert int(sa.num_steps) == 30
    for k in ("w", "t"):
        np.testing.assert_array_equal(a[k], b[k])
        assert not np.array_equal(np.asarray(a[k]), np.asarray(c[k]))
    _assert_fused_matches_reference(lopt, theta, params, 25, _grads_at, num_steps=20)
    path = str(tmp_path / "h.safetensors")
    checkpoint.save_theta(path, theta, lopt)
    assert checkpoint.load_theta(path)[0] == lopt
    with pytest.raises(TypeError, match="horizon_inputs"):
        ScaledSmallFcLOpt(horizon_inputs="yes")
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("d",))
    with pytest.raises(NotImplementedError, match="horizon_inputs"):
        sharded.sharded_transform(lopt, theta, mesh=mesh, param_specs=P())


# ----- loss inputs (what the loss passed as optax's value has done)
def _numpy_loss_inputs(values):
    """Independent float64 transcription of the loss inputs after the losses ``values``: fast and
    slow bias-corrected averages (decays 0.9, 0.99), the first loss, the lowest fast average."""
    v = np.maximum(np.asarray(values, np.float64), 0.0)
    avg = lambda d, n: sum((1 - d) * d ** (n - 1 - j) * v[j] for j in range(n)) / (1 - d ** n)  # noqa: E731
    fast = [avg(0.9, n) for n in range(1, len(v) + 1)]
    slow = avg(0.99, len(v))
    lg = lambda x: np.log(max(x, 1e-30))  # noqa: E731
    return np.array([np.clip(lg(slow) - lg(v[0]), -12, 3) / 3, np.clip(lg(fast[-1]) - lg(min(fast)), 0, 3),
                     np.clip(lg(fast[-1]) - lg(slow), -3, 3)])


def _losses_at(i):  # falls, then rises again (an overfitting validation loss)
    return 2.0 * 0.8 ** i + 0.05 * max(i - 6, 0)


def test_loss_variant_starts_as_the_rule_it_extends_whatever_the_loss():
    from lopt_ext.scaled import NUM_LOSS_INPUTS, with_horizon_inputs, with_loss_inputs
    lopt = ScaledSmallFcLOpt(hidden_size=4, horizon_inputs=True)
    theta = _random_scale_theta(lopt, jax.random.PRNGKey(60))
    ll, tl = with_loss_inputs(lopt, theta, "validation")
    assert ll.uses_loss and ll.loss_source == "validation" and ll.num_scale_inputs == lopt.num_scale_inputs + 3
    params = _tree(jax.random.PRNGKey(61))
    for impl in ("fused", "reference"):
        a = _trajectory(lopt, theta, params, impl, 12, _grads_at, num_steps=20)
        b = _loss_trajectory(ll, tl, params, impl, 12, num_steps=20)
        for k in SHAPES:
            np.testing.assert_array_equal(a[k], b[k])
    # loss then horizon inputs, or horizon then loss: the same rule and theta layout
    base = ScaledSmallFcLOpt(hidden_size=4)
    bt = _random_scale_theta(base, jax.random.PRNGKey(62))
    l1, t1 = with_horizon_inputs(*with_loss_inputs(base, bt))
    l2, t2 = with_loss_inputs(*with_horizon_inputs(base, bt))
    assert l1 == l2 and l1.loss_inputs == "train" and l1.num_scale_inputs == base.num_scale_inputs + 6 + NUM_LOSS_INPUTS
    for a, b in zip(jax.tree_util.tree_leaves(t1), jax.tree_util.tree_leaves(t2)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="train loss"):
        with_loss_inputs(l1, t1, "validation")


def _loss_trajectory(lopt, theta, params, impl, steps, num_steps=None, loss_scale=1.0):
    tx = lopt.transform(theta, impl=impl, num_steps=num_steps)
    p, st = params, tx.init(params)
    upd = jax.jit(lambda g, s, p, v: tx.update(g, s, p, value=v))
    for i in range(steps):
        u, st = upd(_grads_at(i, p), st, p, jnp.float32(loss_scale * _losses_at(i)))
        p = jax.tree_util.tree_map(jnp.add, p, u)
    return p


def test_loss_scale_matches_an_independent_transcription():
    """Over a run whose loss falls and then rises, every step is the plain small_fc_lopt step
    times the float64 transcription's scale, whose u ends with the loss inputs of the losses so
    far; multiplying the loss by a constant changes no step."""
    lopt = ScaledSmallFcLOpt(hidden_size=4, loss_inputs="train")
    theta = _random_scale_theta(lopt, jax.random.PRNGKey(63))
    theta["tensor_scale"]["w_lin"] = theta["tensor_scale"]["w_lin"].at[-3:].set(jnp.asarray([1.5, -2.0, 1.0]))
    base = SmallFcLOpt(hidden_size=4)
    base_theta = {k: v for k, v in theta.items() if k != "tensor_scale"}
    params = _tree(jax.random.PRNGKey(64))
    tx, tb = lopt.transform(theta, impl="reference"), base.transform(base_theta, impl="reference")
    st = tx.init(params)
    for i in range(14):
        g = _grads_at(i, params)
        u, st_new = tx.update(g, st, params, value=jnp.float32(_losses_at(i)))
        ub, _ = tb.update(g, base.state_type(*st[:len(base.state_type._fields)]), params)
        extra = _numpy_loss_inputs([_losses_at(j) for j in range(i + 1)])
        for k in SHAPES:
            s = _numpy_scale(lopt, theta, i, params[k], g[k], st.m[k], st.rms[k], extra)
            np.testing.assert_allclose(np.asarray(u[k]), s * np.asarray(ub[k]), rtol=3e-5, atol=1e-9,
                                       err_msg=f"{k} step {i}")
        params, st = jax.tree_util.tree_map(jnp.add, params, u), st_new
    assert float(st.loss_first) == pytest.approx(2.0)
    start = _tree(jax.random.PRNGKey(64))
    a = _loss_trajectory(lopt, theta, start, "fused", 14)
    b = _loss_trajectory(lopt, theta, start, "fused", 14, loss_scale=1e3)
    for k in SHAPES:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-5, atol=1e-7)


def test_loss_rule_needs_the_loss_fused_matches_reference_and_checkpoints_keep_it(tmp_path):
    from jax.sharding import Mesh, PartitionSpec as P
    from lopt_ext import sharded
    lopt = ScaledSmallFcLOpt(hidden_size=4, progress_inputs=True, horizon_inputs=True, loss_inputs="validation")
    theta = _random_scale_theta(lopt, jax.random.PRNGKey(65))
    theta["tensor_scale"]["w_lin"] = theta["tensor_scale"]["w_lin"].at[-3:].set(jnp.asarray([1.0, -1.5, 0.8]))
    params = _tree(jax.random.PRNGKey(66))
    tx = lopt.transform(theta, num_steps=30)
    st = tx.init(params)
    assert type(st).__name__ == "ScaledProgressHorizonLossState" and type(st) is lopt.state_type
    with pytest.raises(ValueError, match="value="):
        tx.update(params, st, params)
    with pytest.raises(TypeError, match="value"):
        tx.update(params, st, params, value=jnp.ones(3))
    with pytest.raises(TypeError, match="loss_first"):  # a state whose loss fields were tampered with
        tx.update(params, st._replace(loss_first=jnp.ones(2)), params, value=1.0)
    fused, ref = (_loss_trajectory(lopt, theta, params, impl, 25, num_steps=30) for impl in ("fused", "reference"))
    for k in SHAPES:
        a, b = np.asarray(fused[k]), np.asarray(ref[k])
        assert np.all(np.abs(a - b) <= 1e-6 * np.max(np.abs(b)) + 1e-5 * np.abs(b)), k
    path = str(tmp_path / "l.safetensors")
    checkpoint.save_theta(path, theta, lopt)
    assert checkpoint.load_theta(path)[0] == lopt
    with pytest.raises(ValueError, match="loss_inputs"):
        ScaledSmallFcLOpt(loss_inputs="test")
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("d",))
    with pytest.raises(NotImplementedError, match="loss_inputs"):
        sharded.sharded_transform(ScaledSmallFcLOpt(loss_inputs="train"), theta, mesh=mesh, param_specs=P())


# ----- the gap inputs (loss_inputs="train+validation": the validation loss beside the minibatch's)
def _numpy_gap_inputs(train, valid):
    """Independent float64 transcription of the two gap inputs after the losses so far:
    log(slow validation / slow training average) / 3 and the fast validation average's rise over
    its lowest, from bias-corrected averages at decays 0.9 and 0.99."""
    t, v = (np.maximum(np.asarray(x, np.float64), 0.0) for x in (train, valid))
    avg = lambda x, d, n: sum((1 - d) * d ** (n - 1 - j) * x[j] for j in range(n)) / (1 - d ** n)  # noqa: E731
    fast_v = [avg(v, 0.9, n) for n in range(1, len(v) + 1)]
    lg = lambda x: np.log(max(x, 1e-30))  # noqa: E731
    return np.array([np.clip(lg(avg(v, 0.99, len(v))) - lg(avg(t, 0.99, len(t))), -3, 6) / 3,
                     np.clip(lg(fast_v[-1]) - lg(min(fast_v)), 0, 3)])


def _train_losses_at(i):  # a training loss that keeps falling while the validation loss turns up
    return 2.0 * 0.7 ** i


def _valid_losses_at(i):
    return 2.0 * 0.8 ** i + 0.15 * max(i - 5, 0)


def test_gap_scale_matches_an_independent_transcription():
    """Every step is the plain small_fc_lopt step times the float64 transcription's scale, whose
    u ends with the training-loss inputs and then the gap inputs; multiplying both losses by a
    constant changes no step."""
    lopt = ScaledSmallFcLOpt(hidden_size=4, loss_inputs="train+validation")
    assert lopt.uses_validation_loss and lopt.loss_source == "train" and lopt.num_loss_inputs == 5
    theta = _random_scale_theta(lopt, jax.random.PRNGKey(67))
    theta["tensor_scale"]["w_lin"] = theta["tensor_scale"]["w_lin"].at[-5:].set(
        jnp.asarray([1.5, -2.0, 1.0, -1.2, -0.9]))
    base = SmallFcLOpt(hidden_size=4)
    base_theta = {k: v for k, v in theta.items() if k != "tensor_scale"}
    params = _tree(jax.random.PRNGKey(68))
    tx, tb = lopt.transform(theta, impl="reference"), base.transform(base_theta, impl="reference")
    st = tx.init(params)
    assert type(st).__name__ == "SmallFcLOptLossGapState" and type(st) is lopt.state_type
    for i in range(14):
        g = _grads_at(i, params)
        u, st_new = tx.update(g, st, params, value=jnp.float32(_train_losses_at(i)),
                              validation_value=jnp.float32(_valid_losses_at(i)))
        ub, _ = tb.update(g, base.state_type(*st[:len(base.state_type._fields)]), params)
        train = [_train_losses_at(j) for j in range(i + 1)]
        valid = [_valid_losses_at(j) for j in range(i + 1)]
        extra = np.concatenate([_numpy_loss_inputs(train), _numpy_gap_inputs(train, valid)])
        for k in SHAPES:
            s = _numpy_scale(lopt, theta, i, params[k], g[k], st.m[k], st.rms[k], extra)
            np.testing.assert_allclose(np.asarray(u[k]), s * np.asarray(ub[k]), rtol=3e-5, atol=1e-9,
                                       err_msg=f"{k} step {i}")
        params, st = jax.tree_util.tree_map(jnp.add, params, u), st_new
    # the gap grew (the training loss fell 2e-2x below the validation loss) and the validation
    # loss rose above its best: both inputs are away from 0 where it matters
    last = _numpy_gap_inputs([_train_losses_at(j) for j in range(14)], [_valid_losses_at(j) for j in range(14)])
    assert last[0] > 0.1 and last[1] > 0.05, last

    def run(factor):
        tx = lopt.transform(theta, impl="fused")
        p = _tree(jax.random.PRNGKey(68))
        s = tx.init(p)
        upd = jax.jit(lambda g, s, p, v, w: tx.update(g, s, p, value=v, validation_value=w))
        for i in range(14):
            u, s = upd(_grads_at(i, p), s, p, jnp.float32(factor * _train_losses_at(i)),
                       jnp.float32(factor * _valid_losses_at(i)))
            p = jax.tree_util.tree_map(jnp.add, p, u)
        return p
    a, b = run(1.0), run(1e3)
    for k in SHAPES:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-5, atol=1e-7)


def test_gap_rule_starts_as_the_loss_rule_needs_the_validation_loss_and_checkpoints_keep_it(tmp_path):
    from lopt_ext.scaled import NUM_GAP_INPUTS, with_horizon_inputs, with_loss_inputs
    lopt = ScaledSmallFcLOpt(hidden_size=4, horizon_inputs=True, loss_inputs="train")
    theta = _random_scale_theta(lopt, jax.random.PRNGKey(69))
    gl, gt = with_loss_inputs(lopt, theta, "train+validation")
    assert gl.uses_validation_loss and gl.num_scale_inputs == lopt.num_scale_inputs + NUM_GAP_INPUTS
    np.testing.assert_array_equal(gt["tensor_scale"]["w_lin"][:-NUM_GAP_INPUTS], theta["tensor_scale"]["w_lin"])
    # horizon inputs added after the loss inputs land before them, as for the training loss alone
    l1, t1 = with_horizon_inputs(*with_loss_inputs(ScaledSmallFcLOpt(hidden_size=4), _random_scale_theta(
        ScaledSmallFcLOpt(hidden_size=4), jax.random.PRNGKey(70)), "train+validation"))
    assert l1 == gl and t1["tensor_scale"]["w_lin"].shape == gt["tensor_scale"]["w_lin"].shape
    params = _tree(jax.random.PRNGKey(71))

    def run(rule, th, impl, valid_factor):
        tx = rule.transform(th, impl=impl, num_steps=20)
        p, s = params, tx.init(params)
        for i in range(10):
            kw = {"validation_value": jnp.float32(valid_factor * _valid_losses_at(i))} if rule.uses_validation_loss else {}
            u, s = tx.update(_grads_at(i, p), s, p, value=jnp.float32(_train_losses_at(i)), **kw)
            p = jax.tree_util.tree_map(jnp.add, p, u)
        return p
    for impl in ("fused", "reference"):  # zero gap weights: the loss rule, whatever the validation loss
        a, b = run(lopt, theta, impl, 1.0), run(gl, gt, impl, 7.0)
        for k in SHAPES:
            np.testing.assert_array_equal(a[k], b[k])
    gt["tensor_scale"]["w_lin"] = gt["tensor_scale"]["w_lin"].at[-2:].set(jnp.asarray([-1.0, -2.0]))
    fused, ref = run(gl, gt, "fused", 1.0), run(gl, gt, "reference", 1.0)
    for k in SHAPES:
        a, b = np.asarray(fused[k]), np.asarray(ref[k])
        assert np.all(np.abs(a - b) <= 1e-6 * np.max(np.abs(b)) + 1e-5 * np.abs(b)), k
    tx = gl.transform(gt, num_steps=20)
    st = tx.init(params)
    with pytest.raises(ValueError, match="validation_value="):
        tx.update(params, st, params, value=1.0)
    with pytest.raises(TypeError, match="validation_value"):
        tx.update(params, st, params, value=1.0, validation_value=jnp.ones(2))
    with pytest.raises(ValueError, match="already reads the validation loss"):
        with_loss_inputs(ScaledSmallFcLOpt(hidden_size=4, loss_inputs="validation"), theta, "train+validation")
    # a NaN validation loss is a non-finite step: skipped, the state kept
    tx = gl.transform(gt, num_steps=20, skip_nonfinite=True)
    st = tx.init(params)
    u, st2 = tx.update(params, st, params, value=1.0, validation_value=jnp.float32(np.nan))
    assert int(st2.skipped) == 1 and all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree_util.tree_leaves(u))
    np.testing.assert_array_equal(st2.valid_means, st.valid_means)
    path = str(tmp_path / "g.safetensors")
    checkpoint.save_theta(path, gt, gl)
    assert checkpoint.load_theta(path)[0] == gl

"""Non-finite gradients: skip_nonfinite=True skips the step; without it NaN propagates as in the reference.

skip_nonfinite=True: a step whose gradients hold NaN, +-Inf or any |g| > GRAD_LIMIT
(sqrt of the float32 maximum, above which g^2 overflows the accumulators) leaves params
and every state field bit-for-bit unchanged, does not advance state.iteration and adds
one to state.skipped. Default (False): the reference's behaviour, NaN/Inf propagate.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lopt_ext
from lopt_ext.update import GRAD_LIMIT
from helpers import assert_trajectories_agree, make_grads, make_params, max_violation

SHAPES = [(), (1,), (7,), (6, 5), (4, 3, 2), (1, 1), (9, 1, 4)]
IMPLS = ["fused", "reference"]
FAULTS = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf, "huge": 1e20, "-huge": -2 * GRAD_LIMIT}


def _theta(cfg, seed=0):
    theta = cfg.init_theta(jax.random.PRNGKey(seed))
    theta["nn"]["~"]["b0"] = 0.1 * jnp.arange(cfg.hidden_size, dtype=jnp.float32)
    theta["momentum_decays"] = jnp.full_like(theta["momentum_decays"], 0.03)
    return theta


def _warm_state(cfg, params, seed=1):
    """A state with non-zero accumulators (m any sign, second moments > 0), so that
    "unchanged" means something."""
    state = lopt_ext.init_state(cfg, params)
    rng = np.random.default_rng(seed)
    fill = lambda x, pos: jnp.asarray((np.abs if pos else (lambda y: y))(rng.normal(size=x.shape)), jnp.float32)
    return state._replace(iteration=jnp.int32(3),
                          **{f: jax.tree.map(lambda x, pos=(f != "m"): fill(x, pos), getattr(state, f))
                             for f in ("m", "rms", "v_row", "v_col", "v_full")})


@pytest.fixture(scope="module")
def setup():
    cfg = lopt_ext.SmallFcLOpt()
    theta = _theta(cfg)
    params = make_params(SHAPES, seed=3)
    return cfg, theta, params, _warm_state(cfg, params)


_JITS = {}


def _jitted(cfg, theta, impl, skip):
    """One compiled step per (impl, skip) for the module's fixed shapes."""
    key = (impl, skip)
    if key not in _JITS:
        _JITS[key] = jax.jit(lambda s, p, g: lopt_ext.fused_update(cfg, theta, s, p, g, impl=impl,
                                                                   skip_nonfinite=skip))
    return _JITS[key]


def _inject(tree, leaf_index, flat_index, value):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    x = np.array(leaves[leaf_index], np.float32)
    x.reshape(-1)[flat_index % max(x.size, 1)] = value
    leaves[leaf_index] = jnp.asarray(x)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _assert_bitwise_equal(a, b, what):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for (path, x), y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype, f"{what}{jax.tree_util.keystr(path)}"
        assert np.array_equal(np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8)), f"{what}{jax.tree_util.keystr(path)} changed"


def assert_same_nonfinite(got, want, what=""):
    """NaN, +Inf and -Inf at the same places; finite entries within the spec's bar."""
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        name = what + jax.tree_util.keystr(path)
        for check in (np.isnan, np.isposinf, np.isneginf):
            assert np.array_equal(check(a), check(b)), f"{name}: {check.__name__} pattern differs"
        fin = np.isfinite(b)
        if fin.any():
            scale = float(np.max(np.abs(b[fin])))
            assert max_violation(a[fin], b[fin], scale) <= 1.0, name


@pytest.mark.parametrize("impl", IMPLS)
def test_skip_leaves_params_and_state_untouched(setup, impl):
    cfg, theta, params, state = setup
    tx = cfg.transform(theta, impl=impl, skip_nonfinite=True)
    update = jax.jit(tx.update)
    step = _jitted(cfg, theta, impl, True)
    grads = make_grads(params, 7)
    n_leaves = len(jax.tree_util.tree_leaves(params))
    tried = 0
    for kind, value in FAULTS.items():
        for leaf in range(n_leaves):
            bad = _inject(grads, leaf, 3 * leaf + 1, value)
            updates, new_state = update(bad, state, params)
            for u in jax.tree_util.tree_leaves(updates):
                assert not np.any(np.asarray(u)), f"{kind} in leaf {leaf}: non-zero update"
            _assert_bitwise_equal(new_state._replace(skipped=state.skipped), state, f"{kind} leaf {leaf} state")
            assert int(new_state.skipped) == int(state.skipped) + 1
            assert int(new_state.iteration) == int(state.iteration)
            new_params, new_state2 = step(state, params, bad)
            _assert_bitwise_equal(new_params, params, f"{kind} leaf {leaf} params")
            _assert_bitwise_equal(new_state2, new_state, "fused_update vs transform state")
            tried += 1
    assert tried == len(FAULTS) * n_leaves
    # The same jitted function does step on finite gradients.
    updates, new_state = update(grads, state, params)
    assert int(new_state.iteration) == int(state.iteration) + 1 and int(new_state.skipped) == int(state.skipped)
    assert all(np.any(np.asarray(u)) for u in jax.tree_util.tree_leaves(updates))


def test_skip_threshold_is_exact(setup):
    cfg, theta, params, state = setup
    update = jax.jit(cfg.transform(theta, skip_nonfinite=True).update)
    grads = make_grads(params, 8)
    at = _inject(grads, 3, 0, np.float32(GRAD_LIMIT))
    above = _inject(grads, 3, 0, np.nextafter(np.float32(GRAD_LIMIT), np.float32(np.inf)))
    assert np.float32(GRAD_LIMIT) ** 2 < np.inf  # g^2 still finite at the limit
    _, s_at = update(at, state, params)
    _, s_above = update(above, state, params)
    assert int(s_at.skipped) == 0 and int(s_at.iteration) == int(state.iteration) + 1
    assert int(s_above.skipped) == 1 and int(s_above.iteration) == int(state.iteration)
    # At the limit the accumulators stay finite (the reason for the threshold).
    for field in ("m", "rms", "v_row", "v_col", "v_full"):
        for x in jax.tree_util.tree_leaves(getattr(s_at, field)):
            assert np.all(np.isfinite(np.asarray(x))), field


@pytest.mark.parametrize("impl", IMPLS)
def test_skipped_trajectory_equals_clean_trajectory(setup, impl):
    """Faulty steps are skipped; the rest is the clean run (checked against the reference)."""
    cfg, theta, params, _ = setup
    skip_tx = cfg.transform(theta, impl=impl, skip_nonfinite=True)
    ref_tx = cfg.transform(theta, impl="reference")
    skip_up, ref_up = jax.jit(skip_tx.update), jax.jit(ref_tx.update)
    rng = np.random.default_rng(0)
    p_skip, s_skip = params, skip_tx.init(params)
    p_ref, s_ref = params, ref_tx.init(params)
    hist_skip, hist_ref, n_faults = [], [], 0
    n_leaves = len(jax.tree_util.tree_leaves(params))
    for i in range(24):
        grads = make_grads(p_ref, 100 + i)
        faulty = i % 3 == 1
        if faulty:
            kind = list(FAULTS)[i % len(FAULTS)]
            g_in = _inject(grads, int(rng.integers(n_leaves)), int(rng.integers(1000)), FAULTS[kind])
            n_faults += 1
        else:
            g_in = grads
        u, s_skip = skip_up(g_in, s_skip, p_skip)
        p_skip = optax.apply_updates(p_skip, u)
        for field in ("m", "rms", "v_row", "v_col", "v_full"):  # never a NaN in the accumulators
            assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(getattr(s_skip, field)))
        if not faulty:
            u, s_ref = ref_up(grads, s_ref, p_ref)
            p_ref = optax.apply_updates(p_ref, u)
            hist_skip.append((p_skip, s_skip._replace(skipped=jnp.int32(0))))
            hist_ref.append((p_ref, s_ref))
    assert int(s_skip.skipped) == n_faults == 8
    assert int(s_skip.iteration) == 24 - n_faults
    assert_trajectories_agree(hist_skip, hist_ref, f"{impl} skip ")


def test_vmap_skips_per_member(setup):
    cfg, theta, params, state = setup
    members = 3
    stack = lambda xs: jax.tree.map(lambda *x: jnp.stack(x), *xs)
    grads = [make_grads(params, 200 + k) for k in range(members)]
    grads[1] = _inject(grads[1], 4, 5, np.nan)
    fn = jax.jit(jax.vmap(lambda s, p, g: lopt_ext.fused_update(cfg, theta, s, p, g, skip_nonfinite=True)))
    new_p, new_s = fn(stack([state] * members), stack([params] * members), stack(grads))
    assert np.asarray(new_s.skipped).tolist() == [0, 1, 0]
    assert np.asarray(new_s.iteration).tolist() == [int(state.iteration) + k for k in (1, 0, 1)]
    member = lambda t, k: jax.tree.map(lambda x: x[k], t)
    _assert_bitwise_equal(member(new_p, 1), params, "member 1 params")
    _assert_bitwise_equal(member(new_s, 1)._replace(skipped=state.skipped), state, "member 1 state")
    for k in (0, 2):
        rp, rs = _jitted(cfg, theta, "reference", False)(state, params, grads[k])
        assert_trajectories_agree([(member(new_p, k), member(new_s, k))], [(rp, rs)], f"member {k} ")


@pytest.mark.parametrize("kind", ["nan", "+inf", "-inf"])
@pytest.mark.parametrize("leaf", [0, 2, 3, 4])
def test_without_skip_nonfinite_propagates_like_reference(setup, kind, leaf):
    cfg, theta, params, state = setup
    grads = _inject(make_grads(params, 9), leaf, 2, FAULTS[kind])
    fused, ref = _jitted(cfg, theta, "fused", False), _jitted(cfg, theta, "reference", False)
    got, want = fused(state, params, grads), ref(state, params, grads)
    assert_same_nonfinite(got, want, f"{kind} in leaf {leaf}: ")
    # It does propagate: the faulty tensor's new params are not finite...
    bad_p = np.asarray(jax.tree_util.tree_leaves(got[0])[leaf])
    assert not np.all(np.isfinite(bad_p))
    # ...and the counters treat it as an ordinary step.
    assert int(got[1].iteration) == int(state.iteration) + 1 and int(got[1].skipped) == 0
    # Other tensors are unaffected (the normalisation is per tensor).
    for i, x in enumerate(jax.tree_util.tree_leaves(got[0])):
        if i != leaf:
            assert np.all(np.isfinite(np.asarray(x)))


@pytest.mark.parametrize("fill", [np.nan, np.inf, 1e30, 0.0])
def test_all_bad_or_zero_gradients_no_crash(setup, fill):
    cfg, theta, params, state = setup
    grads = jax.tree.map(lambda p: jnp.full(jnp.shape(p), fill, jnp.float32), params)
    got = _jitted(cfg, theta, "fused", False)(state, params, grads)
    want = _jitted(cfg, theta, "reference", False)(state, params, grads)
    assert_same_nonfinite(got, want, f"fill {fill}: ")


def test_low_precision_gradients_skip(setup):
    cfg, theta, params, state = setup
    grads = jax.tree.map(lambda g: g.astype(jnp.bfloat16), make_grads(params, 10))
    grads = _inject(grads, 3, 0, np.inf)
    grads = jax.tree.map(lambda g: g.astype(jnp.bfloat16), grads)
    new_p, new_s = lopt_ext.fused_update(cfg, theta, state, params, grads, skip_nonfinite=True)
    assert int(new_s.skipped) == 1
    _assert_bitwise_equal(new_p, params, "bf16 params")


def test_nonfinite_params_are_not_skipped(setup):
    """skip_nonfinite looks at the gradients only: a NaN parameter propagates, as in the reference."""
    cfg, theta, params, state = setup
    bad_params = _inject(params, 3, 0, np.nan)
    grads = make_grads(params, 11)
    got = _jitted(cfg, theta, "fused", True)(state, bad_params, grads)
    want = _jitted(cfg, theta, "reference", False)(state, bad_params, grads)
    assert int(got[1].skipped) == 0
    assert_same_nonfinite(got, want, "nan param: ")


def test_skip_with_empty_and_zero_size_leaves():
    cfg = lopt_ext.SmallFcLOpt()
    theta = _theta(cfg)
    for params in ({}, {"e": jnp.zeros((0, 4))}, {"e": jnp.zeros((0,)), "w": jnp.ones((3, 2))}):
        state = lopt_ext.init_state(cfg, params)
        grads = jax.tree.map(lambda p: jnp.full(p.shape, jnp.nan), params)
        new_p, new_s = lopt_ext.fused_update(cfg, theta, state, params, grads, skip_nonfinite=True)
        has_values = any(np.size(x) for x in jax.tree_util.tree_leaves(params))
        assert int(new_s.skipped) == int(has_values)  # no element, nothing non-finite
        _assert_bitwise_equal(new_p, params, "params")

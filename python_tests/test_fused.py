"""Fused kernel vs the pure-JAX reference: trajectories, ranks, configs, jit, vmap."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lopt_ext
from helpers import random_theta, trajectory, SHAPES, assert_trajectories_agree, make_grads, make_params, max_violation






def _compare(cfg, theta, params, steps):
    fused = trajectory(cfg, theta, params, steps, "fused")
    ref = trajectory(cfg, theta, params, steps, "reference")
    assert_trajectories_agree([h[0] for h in fused], [h[0] for h in ref], "params")
    assert_trajectories_agree([h[2] for h in fused], [h[2] for h in ref], "state")
    assert int(fused[-1][2].iteration) == steps


@pytest.mark.parametrize("hidden_size", [4, 32])
@pytest.mark.parametrize("hidden_layers", [1, 2, 3])
def test_trajectory_every_rank(hidden_size, hidden_layers):
    cfg = lopt_ext.SmallFcLOpt(hidden_size=hidden_size, hidden_layers=hidden_layers)
    theta = random_theta(cfg, hidden_size + hidden_layers)
    params = make_params(SHAPES + [(3, 4, 5, 2), (6, 2, 3)], seed=1)
    _compare(cfg, theta, params, steps=100)


@pytest.mark.parametrize("hidden_size", [4, 32])
def test_trajectory_large_tensor(hidden_size):
    cfg = lopt_ext.SmallFcLOpt(hidden_size=hidden_size)
    theta = random_theta(cfg, 7)
    params = make_params([(1024, 1031), (1000, 3), (40000,)], seed=2)
    _compare(cfg, theta, params, steps=100 if hidden_size == 4 else 30)


def test_other_decay_configs():
    # Dr == Dm, and two decays each: exercises the packed layout and the broadcasts.
    cfg = lopt_ext.SmallFcLOpt(hidden_size=8, initial_momentum_decays=(0.5, 0.95),
                               initial_rms_decays=(0.9, 0.999), initial_adafactor_decays=(0.8, 0.99),
                               exp_mult=0.1, step_mult=0.01)
    theta = random_theta(cfg, 3)
    _compare(cfg, theta, make_params(SHAPES, seed=4), steps=30)


@pytest.mark.parametrize("kind", ["small_fc_lopt_no_adafactor", "small_fc_lopt_1m1r"])
def test_ablation_configs(kind):
    """The tradeoffs study's feature ablations (lopt_ext.variants): no Adafactor accumulators or
    features, and one decay of each kind."""
    from lopt_ext.variants import KINDS
    cfg = KINDS[kind](hidden_size=4)
    theta = random_theta(cfg, 5)
    _compare(cfg, theta, make_params(SHAPES + [(3, 4, 5, 2), (300, 70)], seed=6), steps=40)
    if kind == "small_fc_lopt_no_adafactor":
        state = lopt_ext.init_state(cfg, make_params(SHAPES, seed=1))
        assert all(np.size(x) == 0 for f in (state.v_row, state.v_col, state.v_full)
                   for x in jax.tree_util.tree_leaves(f))


@pytest.mark.parametrize("hidden_size", [4, 32])
def test_single_step_updates(hidden_size):
    """The step itself (not hidden by p's rounding), from identical inputs, non-zero state."""
    cfg = lopt_ext.SmallFcLOpt(hidden_size=hidden_size)
    theta = random_theta(cfg, 11)
    params = make_params(SHAPES + [(3, 4, 5, 2), (200, 300)], seed=12)
    ref_tx, fused_tx = (cfg.transform(theta, impl=i) for i in ("reference", "fused"))
    state = ref_tx.init(params)
    ref_update = jax.jit(ref_tx.update)
    for i in range(3):  # warm the accumulators with the reference
        _, state = ref_update(make_grads(params, 30 + i), state, params)
    grads = make_grads(params, 40)
    ref, ref_state = ref_update(grads, state, params)
    got, got_state = jax.jit(fused_tx.update)(grads, state, params)
    assert_trajectories_agree([got, got_state], [ref, ref_state], "step ")


def test_eager_matches_jit():
    cfg = lopt_ext.SmallFcLOpt()
    theta = random_theta(cfg, 0)
    params = make_params(SHAPES, seed=0)
    grads = make_grads(params, 1)
    state = lopt_ext.init_state(cfg, params)
    eager = lopt_ext.fused_update(cfg, theta, state, params, grads)
    jitted = jax.jit(lambda *a: lopt_ext.fused_update(cfg, *a))(theta, state, params, grads)
    ref = lopt_ext.fused_update(cfg, theta, state, params, grads, impl="reference")
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(ref)):
        assert max_violation(a, b, float(np.max(np.abs(np.asarray(b))) if np.size(b) else 0)) <= 1


def test_vmap_population_of_thetas():
    cfg = lopt_ext.SmallFcLOpt(hidden_size=8)
    thetas = [random_theta(cfg, s) for s in range(4)]
    stacked_theta = jax.tree.map(lambda *x: jnp.stack(x), *thetas)
    params = [make_params(SHAPES, seed=10 + s) for s in range(4)]
    grads = [make_grads(p, 20 + s) for s, p in enumerate(params)]
    stack = lambda xs: jax.tree.map(lambda *x: jnp.stack(x), *xs)
    state = stack([lopt_ext.init_state(cfg, p) for p in params])

    def one(theta, state, params, grads):
        return lopt_ext.fused_update(cfg, theta, state, params, grads)

    batched = jax.jit(jax.vmap(one))
    out_p, out_s = batched(stacked_theta, state, stack(params), stack(grads))
    # second step from the batched state, to use non-zero accumulators
    out_p, out_s = batched(stacked_theta, out_s, out_p, stack(grads))
    for s in range(4):
        st = lopt_ext.init_state(cfg, params[s])
        rp, rs = lopt_ext.fused_update(cfg, thetas[s], st, params[s], grads[s], impl="reference")
        rp, rs = lopt_ext.fused_update(cfg, thetas[s], rs, rp, grads[s], impl="reference")
        member = jax.tree.map(lambda x: x[s], (out_p, out_s))
        assert_trajectories_agree([member], [(rp, rs)], f"member {s} ")
    # The population axis must reach the kernel as one call, not a loop.
    hlo = batched.lower(stacked_theta, state, stack(params), stack(grads)).as_text()
    assert hlo.count("lopt_fused_update") == 1 and "while" not in hlo


def test_vmap_shared_params_batched_theta():
    # Only theta is batched: the kernel sees broadcast params.
    cfg = lopt_ext.SmallFcLOpt()
    thetas = jax.tree.map(lambda *x: jnp.stack(x), *[random_theta(cfg, s) for s in range(3)])
    params = make_params([(6, 5), (4,)], seed=3)
    grads = make_grads(params, 4)
    state = lopt_ext.init_state(cfg, params)
    out, _ = jax.vmap(lambda t: lopt_ext.fused_update(cfg, t, state, params, grads))(thetas)
    for s in range(3):
        t = jax.tree.map(lambda x: x[s], thetas)
        ref, _ = lopt_ext.fused_update(cfg, t, state, params, grads, impl="reference")
        assert_trajectories_agree([jax.tree.map(lambda x: x[s], out)], [ref])


def test_many_leaves():
    cfg = lopt_ext.SmallFcLOpt()
    theta = random_theta(cfg, 5)
    shapes = [(i % 7 + 1, i % 5 + 1) if i % 3 else (i + 1,) for i in range(64)]
    _compare(cfg, theta, make_params(shapes, seed=6), steps=5)


def test_bfloat16_params_are_computed_in_float32():
    cfg = lopt_ext.SmallFcLOpt()
    theta = random_theta(cfg, 1)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), make_params([(8, 6), (5,)], seed=0))
    grads = make_grads(params, 2)
    state = lopt_ext.init_state(cfg, params)
    new_p, new_s = lopt_ext.fused_update(cfg, theta, state, params, grads)
    ref_p, ref_s = lopt_ext.fused_update(cfg, theta, state, params, grads, impl="reference")
    for a, b in zip(jax.tree.leaves(new_p), jax.tree.leaves(ref_p)):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new_s.m))


def test_deterministic_bitwise():
    cfg = lopt_ext.SmallFcLOpt(hidden_size=32)
    theta = random_theta(cfg, 2)
    params = make_params([(300, 500), (77,), (9, 8, 70)], seed=8)
    grads = make_grads(params, 9)
    state = lopt_ext.init_state(cfg, params)
    f = jax.jit(lambda *a: lopt_ext.fused_update(cfg, *a))
    a = f(theta, state, params, grads)
    b = f(theta, state, params, grads)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_empty_leaf_passes_through():
    cfg = lopt_ext.SmallFcLOpt()
    theta = cfg.init_theta(jax.random.PRNGKey(0))
    params = {"empty": jnp.zeros((0, 3)), "w": jnp.ones((2, 3))}
    grads = jax.tree.map(jnp.ones_like, params)
    state = lopt_ext.init_state(cfg, params)
    new_p, new_s = lopt_ext.fused_update(cfg, theta, state, params, grads)
    assert new_p["empty"].shape == (0, 3)
    assert not np.allclose(np.asarray(new_p["w"]), 1.0)

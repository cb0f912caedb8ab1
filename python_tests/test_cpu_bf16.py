"""The opt-in bf16 precision of the CPU kernel (AMX): lopt_ext._ffi.set_cpu_precision("bf16").

Judged against the pure-JAX reference (float32, HIGHEST precision): one step from a warmed
state, on every rank, hidden sizes 16-64 with 1 or 2 hidden layers. The tolerance is 4% of
the largest step of the update (measured worst 1.7%, at 3 layers): each layer's inputs and
weights are rounded to bf16 (relative error 2^-9), so steps near zero can differ relatively
much more and a per-element relative bar would not mean anything. State outputs never go
through the MLP and must be the float32 kernel's bits. CPUs without AMX-BF16 test the refusal.
"""
import jax
import numpy as np
import pytest

import lopt_ext
from lopt_ext import _ffi
from helpers import SHAPES, make_grads, make_params, random_theta

has_bf16 = _ffi.cpu_bf16_available()
needs_bf16 = pytest.mark.skipif(not has_bf16, reason="this CPU or OS has no AMX-BF16")
BF16_STEP_TOL = 0.04  # of the update's largest step
RANK_SHAPES = SHAPES + [(3, 4, 5, 2), (6, 2, 3), (2, 3, 1, 4, 5), (200, 300), (50000,)]


@pytest.fixture
def cpu_precision():
    """Sets the CPU precision for one test and restores the previous one."""
    old = _ffi._cpu_precision
    yield _ffi.set_cpu_precision
    _ffi._cpu_precision = old


def _warm_state(cfg, theta, params):
    tx = cfg.transform(theta, impl="reference")
    state = tx.init(params)
    upd = jax.jit(tx.update)
    for i in range(3):
        _, state = upd(make_grads(params, 30 + i), state, params)
    return state


def _step(cfg, theta, params, state, impl):
    tx = cfg.transform(theta, impl=impl)
    return jax.device_get(jax.jit(tx.update)(make_grads(params, 40), state, params))


def test_precision_setting_validates(cpu_precision):
    with pytest.raises(ValueError, match="cpu precision"):
        _ffi.set_cpu_precision("tf32")
    _ffi._cpu_precision = "fp16"  # as a bad LOPT_CPU_PRECISION would
    with pytest.raises(ValueError, match="LOPT_CPU_PRECISION"):
        _ffi.cpu_precision()
    cpu_precision("fp32")
    assert _ffi.cpu_precision() == "fp32"


@pytest.mark.skipif(has_bf16, reason="this CPU has AMX-BF16: the refusal is not reachable")
def test_bf16_refused_without_amx(cpu_precision):
    with pytest.raises(ValueError, match="AMX"):
        cpu_precision("bf16")
    assert _ffi.cpu_precision() == "fp32"


@needs_bf16
@pytest.mark.parametrize("hidden_size,hidden_layers", [(16, 2), (32, 2), (32, 3), (48, 2), (64, 1)])
def test_bf16_step_close_to_reference(cpu_precision, hidden_size, hidden_layers):
    cfg = lopt_ext.SmallFcLOpt(hidden_size=hidden_size, hidden_layers=hidden_layers)
    theta = random_theta(cfg, 11)
    params = make_params(RANK_SHAPES, seed=12)
    state = _warm_state(cfg, theta, params)
    ref_upd, _ = _step(cfg, theta, params, state, "reference")
    cpu_precision("fp32")
    upd32, state32 = _step(cfg, theta, params, state, "fused")
    cpu_precision("bf16")
    upd16, state16 = _step(cfg, theta, params, state, "fused")
    ref = [np.asarray(x, np.float64) for x in jax.tree.leaves(ref_upd)]
    scale = max(float(np.max(np.abs(r))) for r in ref)
    worst = max(float(np.max(np.abs(np.asarray(a, np.float64) - r)))
                for a, r in zip(jax.tree.leaves(upd16), ref)) / scale
    assert worst <= BF16_STEP_TOL, f"bf16 step error {worst:.3g} of the largest step"
    # it is a different computation: not the float32 kernel's bits
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(upd16), jax.tree.leaves(upd32)))
    for a, b in zip(jax.tree.leaves(state16), jax.tree.leaves(state32)):
        np.testing.assert_array_equal(a, b)


@needs_bf16
def test_bf16_below_min_hidden_is_float32(cpu_precision):
    """Under 16 hidden units the bf16 setting runs the float32 step, bit for bit."""
    cfg = lopt_ext.SmallFcLOpt(hidden_size=4)
    assert _ffi._cpu_module().BF16_MIN_HIDDEN == 16
    theta = random_theta(cfg, 3)
    params = make_params(RANK_SHAPES, seed=4)
    state = _warm_state(cfg, theta, params)
    cpu_precision("fp32")
    a = _step(cfg, theta, params, state, "fused")
    cpu_precision("bf16")
    b = _step(cfg, theta, params, state, "fused")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@needs_bf16
def test_bf16_vmapped_population_matches_members(cpu_precision):
    """A vmapped population (one custom call) gives each member's own bf16 step, bit for bit."""
    cpu_precision("bf16")
    cfg = lopt_ext.SmallFcLOpt(hidden_size=32)
    thetas = [random_theta(cfg, s) for s in range(3)]
    params = [make_params([(64, 48), (300,)], seed=10 + s) for s in range(3)]
    grads = [make_grads(p, 20 + s) for s, p in enumerate(params)]
    states = [lopt_ext.init_state(cfg, p) for p in params]
    stack = lambda xs: jax.tree.map(lambda *x: np.stack(x), *xs)  # noqa: E731
    step = lambda th, st, p, g: lopt_ext.fused_update(cfg, th, st, params=p, grads=g)  # noqa: E731
    pop = jax.device_get(jax.jit(jax.vmap(step))(stack(thetas), stack(states), stack(params), stack(grads)))
    for i in range(3):
        one = jax.device_get(jax.jit(step)(thetas[i], states[i], params[i], grads[i]))
        for x, y in zip(jax.tree.leaves(one), jax.tree.leaves(pop)):
            np.testing.assert_array_equal(x, y[i])

"""Bad-input battery: every public entry point, wrong shapes/dtypes/trees/configs.

Each case either raises a clear exception whose message names the offending argument,
or gives correct results (checked against the reference); in both cases the inputs are
left untouched. Edge sizes (zero-size, one element, scalars), 64-bit dtypes under x64
and the largest configurations get correct results.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lopt_ext
from lopt_ext import SmallFcLOpt, fused_update, init_state
from helpers import assert_trajectories_agree, make_grads, make_params

CFG = SmallFcLOpt()
THETA = CFG.init_theta(jax.random.PRNGKey(0))
PARAMS = {"w": jnp.linspace(-1, 1, 12, dtype=jnp.float32).reshape(3, 4), "b": jnp.ones((5,), jnp.float32),
          "s": jnp.float32(0.5)}
GRADS = jax.tree.map(lambda x: 0.1 * x + 0.01, PARAMS)
STATE = init_state(CFG, PARAMS)


def _set(tree, path, value):
    """A copy of a nested dict with tree[path[0]]...[path[-1]] = value."""
    if len(path) == 1:
        return {**tree, path[0]: value}
    return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def _theta_with(path, value):
    return _set(THETA, path, value)


def _nan_at(x):
    return jnp.asarray(x).at[(0,) * jnp.ndim(x)].set(jnp.nan)


def _update(theta=THETA, state=STATE, params=PARAMS, grads=GRADS, **kw):
    return lambda: fused_update(CFG, theta, state, params, grads, **kw)


# (id, callable, exception type, substrings the message must contain)
CONFIG_CASES = [
    ("hidden0", lambda: SmallFcLOpt(hidden_size=0), ValueError, ["hidden_size"]),
    ("hidden_neg", lambda: SmallFcLOpt(hidden_size=-3), ValueError, ["hidden_size"]),
    ("hidden_big", lambda: SmallFcLOpt(hidden_size=257), ValueError, ["hidden_size"]),
    ("hidden_float", lambda: SmallFcLOpt(hidden_size=4.0), ValueError, ["hidden_size"]),
    ("hidden_str", lambda: SmallFcLOpt(hidden_size="4"), ValueError, ["hidden_size"]),
    ("hidden_bool", lambda: SmallFcLOpt(hidden_size=True), ValueError, ["hidden_size"]),
    ("hidden_none", lambda: SmallFcLOpt(hidden_size=None), ValueError, ["hidden_size"]),
    ("layers0", lambda: SmallFcLOpt(hidden_layers=0), ValueError, ["hidden_layers"]),
    ("layers17", lambda: SmallFcLOpt(hidden_layers=17), ValueError, ["hidden_layers"]),
    ("layers_float", lambda: SmallFcLOpt(hidden_layers=2.5), ValueError, ["hidden_layers"]),
    ("mom_empty", lambda: SmallFcLOpt(initial_momentum_decays=()), ValueError, ["initial_momentum_decays"]),
    ("mom_17", lambda: SmallFcLOpt(initial_momentum_decays=(0.9,) * 17, initial_adafactor_decays=(0.9,) * 17),
     ValueError, ["initial_momentum_decays"]),
    ("mom_scalar", lambda: SmallFcLOpt(initial_momentum_decays=0.9), TypeError, ["initial_momentum_decays"]),
    ("mom_str", lambda: SmallFcLOpt(initial_momentum_decays=("a", "b", "c")), TypeError, ["initial_momentum_decays"]),
    ("mom_nan", lambda: SmallFcLOpt(initial_momentum_decays=(0.9, float("nan"), 0.9)), ValueError,
     ["initial_momentum_decays"]),
    ("mom_one", lambda: SmallFcLOpt(initial_momentum_decays=(0.9, 1.0, 0.9)), ValueError, ["initial_momentum_decays"]),
    ("mom_neg", lambda: SmallFcLOpt(initial_momentum_decays=(-0.1, 0.9, 0.9)), ValueError,
     ["initial_momentum_decays"]),
    ("rms_big", lambda: SmallFcLOpt(initial_rms_decays=(1.5,)), ValueError, ["initial_rms_decays"]),
    ("rms_count", lambda: SmallFcLOpt(initial_rms_decays=(0.9, 0.99)), ValueError, ["initial_rms_decays"]),
    ("ada_count", lambda: SmallFcLOpt(initial_adafactor_decays=(0.9, 0.99)), ValueError, ["initial_adafactor_decays"]),
    ("ada_inf", lambda: SmallFcLOpt(initial_adafactor_decays=(0.9, float("inf"), 0.9)), ValueError,
     ["initial_adafactor_decays"]),
    ("exp_nan", lambda: SmallFcLOpt(exp_mult=float("nan")), ValueError, ["exp_mult"]),
    ("step_inf", lambda: SmallFcLOpt(step_mult=float("-inf")), ValueError, ["step_mult"]),
    ("step_str", lambda: SmallFcLOpt(step_mult="x"), TypeError, ["step_mult"]),
    ("exp_none", lambda: SmallFcLOpt(exp_mult=None), TypeError, ["exp_mult"]),
]

THETA_CASES = [
    ("not_dict", _update(theta=[THETA]), TypeError, ["theta"]),
    ("none", _update(theta=None), TypeError, ["theta"]),
    ("missing_key", _update(theta={k: v for k, v in THETA.items() if k != "rms_decays"}), ValueError,
     ["theta", "rms_decays"]),
    ("extra_key", _update(theta={**THETA, "lr": jnp.ones(())}), ValueError, ["theta", "lr"]),
    ("w0_shape", _update(theta=_theta_with(["nn", "~", "w0"], jnp.zeros((39, 8)))), ValueError,
     ["theta['nn']['~']['w0']", "(39, 8)"]),
    ("other_config", _update(theta=SmallFcLOpt(hidden_size=8).init_theta(jax.random.PRNGKey(1))), ValueError,
     ["theta['nn']['~']['w0']"]),
    ("other_layers", _update(theta=SmallFcLOpt(hidden_layers=3).init_theta(jax.random.PRNGKey(1))), ValueError,
     ["theta['nn']['~']"]),
    ("batched", _update(theta=jax.tree.map(lambda x: jnp.stack([x, x]), THETA)), ValueError,
     ["theta[", "expects"]),
    ("int_dtype", _update(theta=_theta_with(["momentum_decays"], jnp.zeros(3, jnp.int32))), TypeError,
     ["theta['momentum_decays']", "floating"]),
    ("complex", _update(theta=_theta_with(["nn", "~", "b1"], jnp.zeros(4, jnp.complex64))), TypeError,
     ["theta['nn']['~']['b1']"]),
    ("str_leaf", _update(theta=_theta_with(["nn", "~", "b0"], "zeros")), TypeError, ["theta['nn']['~']['b0']"]),
    ("nan_w0", _update(theta=_theta_with(["nn", "~", "w0"], _nan_at(THETA["nn"]["~"]["w0"]))), ValueError,
     ["theta['nn']['~']['w0']", "non-finite"]),
    ("inf_decay", _update(theta=_theta_with(["rms_decays"], jnp.array([jnp.inf]))), ValueError,
     ["theta['rms_decays']", "non-finite"]),
    ("nan_transform", lambda: CFG.transform(_theta_with(["nn", "~", "b2"], _nan_at(THETA["nn"]["~"]["b2"]))).update(
        GRADS, STATE, PARAMS), ValueError, ["theta['nn']['~']['b2']"]),
]

TREE_CASES = [
    ("int_params", lambda: fused_update(CFG, THETA, init_state(CFG, {"a": jnp.ones(3, jnp.int32)}),
                                        {"a": jnp.ones(3, jnp.int32)}, {"a": jnp.ones(3)}), TypeError,
     ["params['a']", "floating"]),
    ("bool_params", lambda: fused_update(CFG, THETA, init_state(CFG, {"a": jnp.ones(3, bool)}),
                                         {"a": jnp.ones(3, bool)}, {"a": jnp.ones(3)}), TypeError, ["params['a']"]),
    ("int_grads", _update(grads={**GRADS, "b": jnp.ones(5, jnp.int32)}), TypeError, ["grads['b']", "floating"]),
    ("complex_grads", _update(grads={**GRADS, "w": GRADS["w"].astype(jnp.complex64)}), TypeError, ["grads['w']"]),
    ("str_grad", _update(grads={**GRADS, "s": "0.1"}), TypeError, ["grads['s']"]),
    ("object_param", lambda: fused_update(CFG, THETA, STATE, {**PARAMS, "s": object()}, GRADS), TypeError,
     ["params['s']"]),
    ("grads_transposed", _update(grads={**GRADS, "w": GRADS["w"].T}), ValueError, ["grads['w']", "(4, 3)"]),
    ("grads_scalar_vs_1", _update(grads={**GRADS, "s": jnp.ones((1,))}), ValueError, ["grads['s']"]),
    ("grads_missing", _update(grads={"w": GRADS["w"], "b": GRADS["b"]}), ValueError, ["grads", "tree structure"]),
    ("grads_extra", _update(grads={**GRADS, "z": jnp.ones(2)}), ValueError, ["grads", "tree structure"]),
    ("grads_none_leaf", _update(grads={**GRADS, "b": None}), TypeError, ["grads['b']"]),
    ("grads_list", lambda: fused_update(CFG, THETA, init_state(CFG, [jnp.ones(3)]), [jnp.ones(3)], (jnp.ones(3),)),
     ValueError, ["grads", "tree structure"]),
    # tx.update's first argument holds the gradients: the error calls them grads, as users do
    ("tx_grads_name", lambda: CFG.transform(THETA).update({**GRADS, "w": GRADS["w"][:2]}, STATE, PARAMS),
     ValueError, ["grads['w']", "(2, 4)"]),
    ("tx_no_params", lambda: CFG.transform(THETA).update(GRADS, STATE), ValueError, ["params"]),
]

STATE_CASES = [
    ("tuple", _update(state=tuple(STATE)), TypeError, ["state", "SmallFcLOptState"]),
    ("dict", _update(state=STATE._asdict()), TypeError, ["state"]),
    ("none", _update(state=None), TypeError, ["state"]),
    ("other_model", _update(state=init_state(CFG, {"w": jnp.ones((4, 3)), "b": jnp.ones(5), "s": jnp.ones(())})),
     ValueError, ["state.m['w']", "another model"]),
    ("other_tree", _update(state=init_state(CFG, {"w": jnp.ones((3, 4)), "b": jnp.ones(5)})), ValueError,
     ["state.m", "another model"]),
    ("other_decays", _update(state=init_state(SmallFcLOpt(initial_momentum_decays=(0.9, 0.99),
                                                          initial_adafactor_decays=(0.9, 0.99)), PARAMS)),
     ValueError, ["state.m['b']"]),
    ("other_rms_decays", _update(state=init_state(SmallFcLOpt(initial_rms_decays=(0.9, 0.99, 0.999)), PARAMS)),
     ValueError, ["state.rms['b']"]),
    ("m_none", _update(state=STATE._replace(m=None)), ValueError, ["state.m"]),
    ("v_row_missing", _update(state=STATE._replace(v_row={"w": STATE.v_row["w"], "b": STATE.v_row["b"]})),
     ValueError, ["state.v_row"]),
    ("v_col_shape", _update(state=STATE._replace(v_col={**STATE.v_col, "w": jnp.zeros((3, 3))})), ValueError,
     ["state.v_col['w']"]),
    ("m_f16", _update(state=STATE._replace(m=jax.tree.map(lambda x: x.astype(jnp.float16), STATE.m))), TypeError,
     ["state.m", "float32"]),
    ("rms_bf16_ref", _update(state=STATE._replace(rms=jax.tree.map(lambda x: x.astype(jnp.bfloat16), STATE.rms)),
                             impl="reference"), TypeError, ["state.rms", "float32"]),
    ("v_full_int", _update(state=STATE._replace(v_full={**STATE.v_full, "b": jnp.zeros((5, 3), jnp.int32)})),
     TypeError, ["state.v_full['b']"]),
    ("iteration_float", _update(state=STATE._replace(iteration=jnp.float32(0))), TypeError, ["state.iteration"]),
    ("iteration_vector", _update(state=STATE._replace(iteration=jnp.zeros(2, jnp.int32))), ValueError,
     ["state.iteration"]),
    ("skipped_float", _update(state=STATE._replace(skipped=0.0)), TypeError, ["state.skipped"]),
    ("skipped_str", _update(state=STATE._replace(skipped="0")), TypeError, ["state.skipped"]),
]

MISC_CASES = [
    ("lopt_str", lambda: fused_update("small_fc", THETA, STATE, PARAMS, GRADS), TypeError, ["lopt"]),
    ("impl_bad", _update(impl="cuda"), ValueError, ["impl"]),
    ("impl_none", _update(impl=None), ValueError, ["impl"]),
    ("tx_impl_bad", lambda: CFG.transform(THETA, impl="Fused"), ValueError, ["impl"]),
    ("tx_theta_bad", lambda: CFG.transform({"nn": {}}), ValueError, ["theta"]),
    ("init_state_lopt", lambda: init_state("cfg", PARAMS), TypeError, ["lopt"]),
    ("init_state_str_leaf", lambda: init_state(CFG, {"a": "x"}), TypeError, ["params['a']"]),
    ("init_state_int_leaf", lambda: init_state(CFG, {"a": jnp.ones(2, jnp.int32)}), TypeError, ["params['a']"]),
]

ALL_CASES = CONFIG_CASES + THETA_CASES + TREE_CASES + STATE_CASES + MISC_CASES


def _snapshot(*trees):
    return [np.array(x, copy=True) for t in trees for x in jax.tree_util.tree_leaves(t)
            if isinstance(x, (jax.Array, np.ndarray))]


@pytest.mark.parametrize("case", ALL_CASES, ids=[c[0] for c in ALL_CASES])
def test_bad_input_raises_naming_the_argument(case):
    _, fn, exc, words = case
    before = _snapshot(THETA, STATE, PARAMS, GRADS)
    with pytest.raises(exc) as info:
        jax.block_until_ready(fn())
    msg = str(info.value)
    for w in words:
        assert w in msg, f"message {msg!r} does not name {w!r}"
    after = _snapshot(THETA, STATE, PARAMS, GRADS)
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(before, after))


def test_case_count():
    """The battery's size, for the report (each case above is one input tried)."""
    assert len(ALL_CASES) >= 70


def _ref_and_fused(cfg, theta, params, grads, state=None):
    state = init_state(cfg, params) if state is None else state
    run = lambda impl: jax.jit(lambda t, s, p, g: fused_update(cfg, t, s, p, g, impl=impl))
    return run("fused")(theta, state, params, grads), run("reference")(theta, state, params, grads)


def _check_untouched_numpy(fn, *trees):
    """Calls fn on numpy copies of the trees and checks that they are unchanged."""
    np_trees = [jax.tree.map(lambda x: np.array(x), t) for t in trees]
    copies = [jax.tree.map(lambda x: x.copy(), t) for t in np_trees]
    result = jax.block_until_ready(fn(*np_trees))
    for t, c in zip(np_trees, copies):
        for a, b in zip(jax.tree_util.tree_leaves(t), jax.tree_util.tree_leaves(c)):
            assert np.array_equal(a, b), "an input array was modified in place"
    return result


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_numpy_and_jax_inputs_left_untouched(impl, jit):
    theta = CFG.init_theta(jax.random.PRNGKey(2))
    params = make_params([(6, 5), (7,), ()], seed=1)
    grads = make_grads(params, 2)
    fn = lambda t, s, p, g: fused_update(CFG, t, s, p, g, impl=impl)
    fn = jax.jit(fn) if jit else fn
    state = init_state(CFG, params)
    new_p, new_s = _check_untouched_numpy(fn, theta, state, params, grads)
    # jax inputs: not deleted (no donation) and unchanged
    before = _snapshot(params, grads, state)
    fn(theta, state, params, grads)
    assert all(not x.is_deleted() for x in jax.tree_util.tree_leaves((params, grads, state)))
    assert all(np.array_equal(a, b) for a, b in zip(before, _snapshot(params, grads, state)))
    ref = fused_update(CFG, theta, state, params, grads, impl="reference")
    assert_trajectories_agree([(new_p, new_s)], [ref])


EDGE_TREES = {
    "zero_size": {"a": jnp.zeros((0,)), "b": jnp.zeros((0, 5)), "c": jnp.zeros((3, 0, 2)), "w": jnp.ones((2, 3))},
    "one_element": {"a": jnp.full((1,), 0.3), "b": jnp.full((1, 1), -0.2), "c": jnp.full((1, 1, 1), 0.7),
                    "d": jnp.full((1, 1, 1, 1), 2.0)},
    "unit_dims": {"a": jnp.linspace(0, 1, 7).reshape(7, 1), "b": jnp.linspace(-1, 1, 6).reshape(1, 6),
                  "c": jnp.linspace(0, 2, 10).reshape(1, 10, 1)},
    "scalars": {"py": 0.5, "np": np.float32(-1.5), "jnp": jnp.float32(2.0), "np0d": np.array(0.25, np.float32)},
    "empty_dict": {},
    "none": None,
    "nested": {"a": [jnp.ones((2, 3)), (jnp.ones(4), {"x": jnp.float32(3.0)})], "b": None},
}


@pytest.mark.parametrize("name", list(EDGE_TREES))
def test_edge_sizes_match_reference(name):
    params = EDGE_TREES[name]
    theta = CFG.init_theta(jax.random.PRNGKey(3))
    grads = jax.tree.map(lambda x: 0.3 * jnp.asarray(x, jnp.float32) + 0.05, params)
    state = init_state(CFG, params)
    for _ in range(2):  # twice: the second step starts from non-zero state
        got, want = _ref_and_fused(CFG, theta, params, grads, state)
        # scalars and 1-element tensors: normalised over one element (the spec's absolute tolerance)
        scale_fix = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float64), t)
        assert_trajectories_agree([scale_fix(got)], [scale_fix(want)], f"{name} ")
        for x, p in zip(jax.tree_util.tree_leaves(got[0]), jax.tree_util.tree_leaves(params)):
            assert jnp.shape(x) == jnp.shape(p)
        params, state = got
    assert int(state.iteration) == 2


def test_tx_on_edge_trees():
    """The optax path on a mixed tree, jitted, including zero-size and scalar leaves."""
    params = {**EDGE_TREES["zero_size"], **{f"s{k}": v for k, v in EDGE_TREES["scalars"].items()}}
    params = jax.tree.map(jnp.asarray, params)
    theta = CFG.init_theta(jax.random.PRNGKey(4))
    grads = jax.tree.map(lambda x: x * 0.5 + 0.1, params)
    outs = {}
    for impl in ("fused", "reference"):
        tx = CFG.transform(theta, impl=impl)
        updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
        outs[impl] = (optax.apply_updates(params, updates), state)
    assert_trajectories_agree([outs["fused"]], [outs["reference"]])


def test_x64_dtypes():
    """float64 params/grads/theta with x64 on: computed in float32 (documented), params keep
    float64, state stays float32, and the result matches the reference."""
    with jax.enable_x64(True):
        cfg = SmallFcLOpt()
        theta = jax.tree.map(lambda x: x.astype(jnp.float64), cfg.init_theta(jax.random.PRNGKey(5)))
        params = {"w": jnp.linspace(-1, 1, 20, dtype=jnp.float64).reshape(4, 5), "b": jnp.ones(3, jnp.float64),
                  "s": jnp.float64(0.3)}
        grads = jax.tree.map(lambda x: 0.2 * x + 0.01, params)
        state = init_state(cfg, params)
        for impl, skip in (("fused", True), ("reference", False)):
            if True:
                new_p, new_s = jax.jit(lambda t, s, p, g: fused_update(cfg, t, s, p, g, impl=impl,
                                                                       skip_nonfinite=skip))(theta, state, params, grads)
                assert all(x.dtype == jnp.float64 for x in jax.tree_util.tree_leaves(new_p))
                assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(new_s.m))
                assert new_s.iteration.dtype == jnp.int32
        got, want = _ref_and_fused(cfg, theta, params, grads)
        f32 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float32), t)
        want32 = fused_update(cfg, f32(theta), state, f32(params), f32(grads), impl="reference")
        assert_trajectories_agree([f32(got)], [f32(want)])
        assert_trajectories_agree([f32(got)], [want32])
        # A float64 state is rejected, naming it
        bad = state._replace(rms=jax.tree.map(lambda x: x.astype(jnp.float64), state.rms))
        with pytest.raises(TypeError, match=r"state\.rms"):
            fused_update(cfg, theta, bad, params, grads)
        # int64 params are still rejected
        with pytest.raises(TypeError, match=r"params\['b'\]"):
            fused_update(cfg, theta, state, {**params, "b": jnp.ones(3, jnp.int64)}, grads)


def test_largest_configuration():
    """hidden 256, 16 layers, 16 decays each: the bounds of the stack tiles."""
    cfg = SmallFcLOpt(hidden_size=256, hidden_layers=16, initial_momentum_decays=tuple(np.linspace(0.5, 0.99, 16)),
                      initial_rms_decays=tuple(np.linspace(0.6, 0.999, 16)),
                      initial_adafactor_decays=tuple(np.linspace(0.7, 0.99, 16)))
    theta = cfg.init_theta(jax.random.PRNGKey(6))
    params = make_params([(20, 3), (17,), (), (2, 3, 4)], seed=7)
    got, want = _ref_and_fused(cfg, theta, params, make_grads(params, 8))
    assert_trajectories_agree([got], [want])


@pytest.mark.parametrize("hidden_size,hidden_layers", [(1, 1), (3, 5)])
def test_smallest_configurations(hidden_size, hidden_layers):
    cfg = SmallFcLOpt(hidden_size=hidden_size, hidden_layers=hidden_layers, initial_momentum_decays=(0.5,),
                      initial_rms_decays=(0.9,), initial_adafactor_decays=(0.0,))
    theta = cfg.init_theta(jax.random.PRNGKey(9))
    params = make_params([(5, 4), (3,)], seed=10)
    got, want = _ref_and_fused(cfg, theta, params, make_grads(params, 11))
    assert_trajectories_agree([got], [want])


def test_vmap_zero_members():
    params = make_params([(4, 3), (5,)], seed=12)
    stack0 = lambda t: jax.tree.map(lambda x: jnp.zeros((0,) + jnp.shape(x), jnp.float32), t)
    state = init_state(CFG, params)
    batched_state = state._replace(iteration=jnp.zeros((0,), jnp.int32), skipped=jnp.zeros((0,), jnp.int32),
                                   **{f: stack0(getattr(state, f)) for f in ("m", "rms", "v_row", "v_col", "v_full")})
    fn = jax.vmap(lambda s, p, g: fused_update(CFG, THETA, s, p, g))
    new_p, new_s = fn(batched_state, stack0(params), stack0(params))
    assert jax.tree.map(jnp.shape, new_p) == jax.tree.map(jnp.shape, stack0(params))


def test_ffi_rejects_bad_attributes_and_operands():
    """The custom call itself (no Python validation in front) errors out cleanly."""
    from lopt_ext import _ffi
    _ffi.ensure_registered()
    packed = CFG.pack_theta(THETA, jnp.int32(0))
    p = jnp.ones((6,), jnp.float32)
    ops = [packed, p, p, jnp.zeros((6, 3)), jnp.zeros((6, 1)), jnp.zeros((6, 3))]
    outs = [jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (p, ops[3], ops[4], ops[5])]

    def call(operands=ops, results=outs, **attrs):
        kw = dict(hidden_size=np.int64(4), hidden_layers=np.int64(2), dm=np.int64(3), dr=np.int64(1),
                  da=np.int64(3), exp_mult=np.float32(1e-3), step_mult=np.float32(1e-3), write_delta=False,
                  precision=np.int64(0), cpu_precision=np.int64(0))
        kw.update(attrs)
        return jax.block_until_ready(jax.ffi.ffi_call(_ffi.FUSED_UPDATE, results)(*operands, **kw))

    call()  # the well-formed call works
    bad = [
        (dict(hidden_size=np.int64(2**32 + 4)), "hidden_size"),
        (dict(hidden_size=np.int64(-4)), "hidden_size"),
        (dict(hidden_size=np.int64(8)), "packed weights"),
        (dict(dm=np.int64(2)), "decay count"),
        (dict(da=np.int64(2), dm=np.int64(2)), "packed weights"),
        (dict(da=np.int64(0)), "packed weights"),
        (dict(operands=ops[:5]), "operand missing|accumulator"),
        (dict(operands=ops[:1] + [p, p, jnp.zeros((6, 2)), ops[4], ops[5]]), "momentum"),
        (dict(operands=ops[:1] + [p, p.astype(jnp.float16), *ops[3:]]), "float32"),
        (dict(operands=[packed[:-1], *ops[1:]]), "packed"),
        (dict(cpu_precision=np.int64(7)), "cpu_precision"),
    ]
    if not _ffi.cpu_bf16_available():
        bad.append((dict(cpu_precision=np.int64(1)), "AMX"))
    for kw, word in bad:
        with pytest.raises(Exception, match=word) as info:
            call(**kw)
        assert "Segmentation" not in str(info.value)


def test_mlp_lopt_ffi_call_rejects_malformed_operands():
    """The MLPLOpt custom call checks sizes, shapes, dtypes and counts before touching memory."""
    from lopt_ext import MLPLOpt, _ffi
    lopt = MLPLOpt(hidden_size=4)
    _ffi.ensure_registered()
    packed = lopt.pack_theta(lopt.init_theta(jax.random.PRNGKey(0)), 0)
    p = jnp.ones((3, 2))
    m = jnp.zeros((3, 2, 6))
    outs = [jax.ShapeDtypeStruct(p.shape, jnp.float32), jax.ShapeDtypeStruct(m.shape, jnp.float32)]

    def call(operands=(packed, p, p, m), results=outs, **attrs):
        kw = dict(hidden_size=np.int64(4), hidden_layers=np.int64(2), exp_mult=np.float32(1e-3),
                  step_mult=np.float32(1e-3), write_delta=False)
        kw.update(attrs)
        return jax.block_until_ready(jax.ffi.ffi_call("lopt_mlp_update", list(results))(*operands, **kw))

    call()
    bad = [
        (dict(hidden_size=np.int64(0)), "hidden_size"),
        (dict(hidden_size=np.int64(8)), "packed weights"),
        (dict(hidden_layers=np.int64(2**40)), "hidden_layers"),
        (dict(operands=(packed, p, p)), "per tensor"),
        (dict(operands=(packed, p, p, jnp.zeros((3, 2, 3)))), "momentum"),
        (dict(operands=(packed, p, p.astype(jnp.float16), m)), "grads"),
        (dict(operands=(packed[:-1], p, p, m)), "packed weights"),
        (dict(results=outs[:1]), "per tensor"),
        (dict(results=[outs[1], outs[1]]), "result 0"),
    ]
    for kw, word in bad:
        with pytest.raises(Exception, match=word) as info:
            call(**kw)
        assert "Segmentation" not in str(info.value)


def _available_memory_bytes():
    from lopt_ext.tradeoffs import available_memory_bytes
    return available_memory_bytes() or 0


@pytest.mark.slow
def test_tensor_over_2_31_elements():
    """A rank-1 tensor of 2^31 + 17 float32 elements through the whole stack (needs ~60 GB).

    Skipped where memory is short; csrc/tests/lopt_kernel_test.cc covers the index math of the
    per-element loops beyond 2^31 without the memory."""
    n = 2**31 + 17
    cfg = SmallFcLOpt(initial_momentum_decays=(0.9,), initial_rms_decays=(0.999,), initial_adafactor_decays=(0.99,))
    need = n * 4 * 14  # p, g, m, rms, v, out, new state, and the reference slice
    if _available_memory_bytes() < need:
        pytest.skip(f"needs ~{need / 2**30:.0f} GiB free")
    theta = cfg.init_theta(jax.random.PRNGKey(0))
    p = jnp.sin(jnp.arange(n, dtype=jnp.float32) * 1e-3)
    g = jnp.cos(jnp.arange(n, dtype=jnp.float32) * 7e-4) * 0.1
    state = init_state(cfg, {"x": p})
    new_p, new_s = jax.jit(lambda s, p, g: fused_update(cfg, theta, s, {"x": p}, {"x": g}))(state, p, g)
    # Elementwise state beyond 2^31 must be the hand-computed value.
    tail = slice(n - 1000, n)
    b, = cfg.decays(theta)[0]
    m_want = (1 - b) * np.asarray(g[tail])
    np.testing.assert_allclose(np.asarray(new_s.m["x"][tail, 0]), m_want, rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(new_p["x"][tail])))
    assert not np.array_equal(np.asarray(new_p["x"][tail]), np.asarray(p[tail]))

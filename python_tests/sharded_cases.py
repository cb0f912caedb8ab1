"""Multi-device cases, run by test_sharded.py in a subprocess with 8 host CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8): the flag must be set before jax
starts, and must not leak into the other tests. Run alone with:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python -m pytest -q python_tests/sharded_cases.py

Truth = the single-device pure-JAX reference (impl="reference"); the spec's agreement
criterion per tensor (helpers.assert_trajectories_agree).
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import lopt_ext
from lopt_ext import sharded
from helpers import assert_trajectories_agree


# numpy-built inputs: eager jax.random per shape would compile once per shape (slow here)
def make_params(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return {f"t{i}_{'x'.join(map(str, s)) or 'scalar'}": rng.standard_normal(s).astype(np.float32)
            for i, s in enumerate(shapes)}


def make_grads(params, seed):
    """Per-tensor gradient magnitudes spread over 1e-3..1e1 (as helpers.make_grads)."""
    rng = np.random.default_rng(1000 + seed)
    mags = np.logspace(-3, 1, max(len(params), 2))
    return {k: (mags[i % len(mags)] * rng.standard_normal(np.shape(p)) + 0.1 * p).astype(np.float32)
            for i, (k, p) in enumerate(params.items())}

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (host) devices: run via test_sharded.py")

# (shape, spec) over the mesh ("x": 2, "y": 4). Comments: factored axes (d1 = row-mean
# axis, d0 = column-mean axis) and what is sharded.
FSDP_CASES = [
    ((16,), P("y")),                       # rank 1 over 4 devices
    ((24,), P(("x", "y"))),                # rank 1 over all 8
    ((16, 12), P("x", "y")),               # d0=0 on x, d1=1 on y: both factored axes sharded
    ((12, 16), P(None, ("x", "y"))),       # d0 (column-mean axis) over 8 devices
    ((10, 10), P("x", None)),              # square: d1=0 (the row_col_mean axis) sharded over 2
    ((8, 10), P(None, "x")),               # d0=1 sharded, d1 not
    ((7, 16), P(None, "y")),               # odd (7) axis left whole, the other sharded
    ((1, 8), P(None, "y")),                # size-1 axis: still factored
    ((4, 8, 6), P("x", "y", None)),        # rank 3: a non-factored axis (0) and d0 sharded
    ((2, 12, 8), P(None, "y", "x")),       # rank 3: d0 on y, d1 on x
    ((2, 4, 6, 8), P("x", None, None, "y")),  # rank 4
    ((5, 3), P()),                         # replicated rank 2, rank 1, scalar beside sharded ones
    ((3,), P()),
    ((), P()),
]


@functools.lru_cache(maxsize=None)
def mesh2d():
    return jax.make_mesh((2, 4), ("x", "y"))


def _put(tree, specs, mesh):
    return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs,
                                  is_leaf=lambda x: isinstance(x, P))


def _setup(cases, seed=1, hidden=8):
    shapes = [s for s, _ in cases]
    params = make_params(shapes, seed=seed)
    specs = dict(zip(params, [sp for _, sp in cases]))
    cfg = lopt_ext.SmallFcLOpt(hidden_size=hidden)
    theta = cfg.init_theta(jax.random.PRNGKey(seed))
    return cfg, theta, params, specs


def _run(cfg, theta, params, specs, mesh, steps, impl="fused", stats="kernel"):
    """steps of sharded_update (jit) vs the single-device reference; returns both trajectories."""
    ref_p, ref_s = params, lopt_ext.init_state(cfg, params)
    ref_step = jax.jit(functools.partial(lopt_ext.fused_update, cfg, impl="reference"))
    p = _put(params, specs, mesh)
    s = sharded.init_sharded_state(cfg, params, specs, mesh)
    step = jax.jit(lambda s, p, g: sharded.sharded_update(cfg, theta, s, p, g, mesh=mesh, param_specs=specs,
                                                          impl=impl, stats=stats))
    got, want = [], []
    for i in range(steps):
        g = make_grads(params, 10 + i)
        ref_p, ref_s = ref_step(theta, ref_s, ref_p, g)
        p, s = step(s, p, _put(g, specs, mesh))
        got.append((p, s))
        want.append((ref_p, ref_s))
    return got, want, step, (s, p, _put(g, specs, mesh))


def _assert_agree(got, want):
    assert_trajectories_agree([x[0] for x in got], [x[0] for x in want], "params ")
    for field in ("m", "rms", "v_row", "v_col", "v_full"):
        assert_trajectories_agree([getattr(x[1], field) for x in got], [getattr(x[1], field) for x in want],
                                  f"state.{field} ")
    assert int(got[-1][1].iteration) == int(want[-1][1].iteration)


@pytest.mark.parametrize("impl", ["fused", pytest.param("reference", marks=pytest.mark.slow)])
def test_fsdp_matches_single_device(impl, monkeypatch):
    """FSDP/ZeRO style: every rank, both factored axes sharded, odd and size-1 axes,
    replicated leaves beside sharded ones; 2 steps against the single-device reference.
    impl='reference' runs the same sharded statistics with jnp feature sums and a jnp apply
    stage. Tiny statistics chunks (13 elements) make every tensor take the chunk loops and
    a remainder."""
    monkeypatch.setattr(sharded, "CHUNK_ELEMENTS", 13)
    cfg, theta, params, specs = _setup(FSDP_CASES)
    got, want, step, args = _run(cfg, theta, params, specs, mesh2d(), steps=2, impl=impl)
    _assert_agree(got, want)
    # layouts: outputs keep the parameters' sharding, v_row drops the d0 entry
    p, s = got[-1]
    for k, sp in specs.items():
        assert p[k].sharding.spec == P(*sp, *([None] * (p[k].ndim - len(sp)))) or not sp, (k, p[k].sharding)
    want_specs = sharded.state_specs(cfg, params, specs)
    for k in params:
        for field in ("m", "v_row", "v_col"):
            leaf = getattr(s, field)[k]
            if leaf.size and getattr(want_specs, field)[k] != P(None):
                assert leaf.sharding.is_equivalent_to(NamedSharding(mesh2d(), getattr(want_specs, field)[k]),
                                                      leaf.ndim), (k, field, leaf.sharding)
    if impl == "fused":
        _assert_no_gather(step, args, params)


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_scaled_rule_matches_single_device(impl, monkeypatch):
    """ScaledSmallFcLOpt (the shipped default's kind): its per-tensor scale needs sums over
    the whole tensor, psum'd over the axes that shard it; 3 steps against the single-device
    reference, every kind of sharding of FSDP_CASES, with a scale that varies per tensor."""
    monkeypatch.setattr(sharded, "CHUNK_ELEMENTS", 13)
    from lopt_ext import scaled
    monkeypatch.setattr(scaled, "FUSED_SUMS_MIN_ELEMENTS", 0)  # the fused step's kernel sums, on shards too
    _, _, params, specs = _setup(FSDP_CASES)
    cfg = lopt_ext.ScaledSmallFcLOpt(hidden_size=8)
    theta = cfg.init_theta(jax.random.PRNGKey(3))
    n = cfg.num_scale_inputs
    ts = dict(theta["tensor_scale"], w_lin=0.5 * jax.random.normal(jax.random.PRNGKey(4), (n,)),
              w2=0.5 * jax.random.normal(jax.random.PRNGKey(5), (cfg.scale_hidden,)), b=jnp.asarray([0.3]))
    theta = dict(theta, tensor_scale=ts)
    got, want, step, args = _run(cfg, theta, params, specs, mesh2d(), steps=3, impl=impl)
    _assert_agree(got, want)
    # the scale is not 1 (else this would not test it): the plain rule's step differs
    plain = lopt_ext.SmallFcLOpt(hidden_size=8)
    plain_theta = {k: v for k, v in theta.items() if k != "tensor_scale"}
    st = lopt_ext.init_state(plain, params)
    g = make_grads(params, 10)
    a, _ = lopt_ext.fused_update(cfg, theta, st, params=params, grads=g, impl="reference")
    b, _ = lopt_ext.fused_update(plain, plain_theta, st, params=params, grads=g, impl="reference")
    assert max(float(jnp.max(jnp.abs(a[k] - b[k]))) for k in params) > 1e-4
    if impl == "fused":
        _assert_no_gather(step, args, params)
    # the progress variant keeps per-tensor state the sharded path does not lay out yet
    with pytest.raises(NotImplementedError, match="progress_inputs"):
        sharded.sharded_transform(lopt_ext.ScaledSmallFcLOpt(hidden_size=8, progress_inputs=True),
                                  theta, mesh=mesh2d(), param_specs=specs)


def _assert_no_gather(step, args, params):
    """The compiled sharded step only all-reduces (row/col sums, 28 feature sums); no
    all-gather / all-to-all / collective-permute, and each all-reduce moves small vectors."""
    hlo = step.lower(*args).compile().as_text()
    for op in ("all-gather", "all-to-all", "collective-permute", "reduce-scatter"):
        assert op not in hlo, f"{op} in the compiled sharded update"
    assert "all-reduce" in hlo
    # largest all-reduce payload: the biggest v_row/v_col shard or a 28-vector, never a tensor
    biggest = max(int(np.prod(p.shape)) for p in params.values())
    for line in hlo.splitlines():
        if "all-reduce(" in line or "all-reduce-start(" in line:
            shapes = re.findall(r"f32\[([\d,]*)\]", line.split("=")[1].split("all-reduce")[0])
            for shp in shapes:
                n = int(np.prod([int(d) for d in shp.split(",") if d])) if shp else 1
                assert n < biggest, f"all-reduce of {n} floats: {line.strip()[:200]}"


@pytest.mark.parametrize("stats", ["kernel", pytest.param("jnp", marks=pytest.mark.slow)])
def test_one_dimensional_mesh_factored_axes(stats):
    """A 1-D mesh of all 8 devices over the row (d1) axis alone and the column (d0) axis alone
    (an Auto-axis mesh: the other tests use make_mesh's default Explicit axes); feature
    statistics from the kernel's partial-sums pass and from chunked jnp reductions."""
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    cases = [((16, 24), P("fsdp", None)), ((16, 24), P(None, "fsdp")), ((8, 3, 16), P("fsdp", None, None)),
             ((40,), P("fsdp"))]
    cfg, theta, params, specs = _setup(cases, seed=4, hidden=4)
    got, want, _, _ = _run(cfg, theta, params, specs, mesh, steps=2, stats=stats)
    _assert_agree(got, want)


def test_uneven_shard_is_a_clear_error():
    """shard_map needs even shards: a 10-long axis over 4 devices is refused, naming the leaf."""
    cfg, theta, params, specs = _setup([((10, 10), P("y", None))])
    state = lopt_ext.init_state(cfg, params)
    with pytest.raises(ValueError, match=r"param_specs\['t0_10x10'\].*not divisible"):
        sharded.sharded_update(cfg, theta, state, params, params, mesh=mesh2d(), param_specs=specs)


def test_data_parallel_jit_replicated():
    """Case (a) with plain jit, ranks 0-4: replicated params, batch sharded over 8 devices; jax's
    partitioner all-reduces the gradients and the ordinary fused transform runs on each device's
    full (replicated) copy. Same trajectory as one device."""
    mesh = jax.make_mesh((8,), ("data",))
    cfg, theta, params, _ = _setup([((6, 5), None), ((5,), None), ((5, 3), None), ((3, 2, 2), None),
                                    ((2, 1, 2, 3), None), ((), None)], seed=2, hidden=4)
    w_true = jax.random.normal(jax.random.PRNGKey(9), (6, 3))

    def loss(p, x):  # every rank 0..4 gets a gradient
        h = jnp.tanh(x @ p["t0_6x5"] + p["t1_5"])
        y = h @ p["t2_5x3"] + jnp.sum(p["t3_3x2x2"]) * 0.1 + jnp.sum(p["t4_2x1x2x3"] ** 2) * 0.01
        return jnp.mean((y * p["t5_scalar"] - x @ w_true) ** 2)

    tx = cfg.transform(theta)

    def train_step(p, s, x):
        g = jax.grad(loss)(p, x)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    rep = NamedSharding(mesh, P())
    xs = [jax.random.normal(jax.random.PRNGKey(20 + i), (64, 6)) for i in range(3)]
    dp = jax.jit(train_step, in_shardings=(rep, rep, NamedSharding(mesh, P("data"))), out_shardings=(rep, rep))
    single = jax.jit(train_step)
    p1, s1 = params, tx.init(params)
    p8, s8 = jax.device_put(params, rep), jax.device_put(tx.init(params), rep)
    got, want = [], []
    for x in xs:
        p1, s1 = single(p1, s1, x)
        p8, s8 = dp(p8, s8, x)
        got.append(p8)
        want.append(p1)
    assert_trajectories_agree(got, want, "params ")
    assert len(p8["t0_6x5"].sharding.device_set) == 8


def test_data_parallel_shard_map_grad_mean():
    """Case (a) inside the user's shard_map: each device's gradients differ (its batch
    slice); local_update(grad_mean_axes=("data",)) pmeans them, then updates its replica.
    Equals one device stepping with the mean gradient."""
    mesh = jax.make_mesh((8,), ("data",))
    cfg, theta, params, _ = _setup([((6, 5), None), ((7,), None), ((), None), ((2, 3, 4), None),
                                    ((3, 1, 2, 2), None)], seed=3, hidden=4)
    per_dev = [make_grads(params, 30 + d) for d in range(8)]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_dev)
    mean_g = jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), stacked)
    state = lopt_ext.init_state(cfg, params)
    want_p, want_s = lopt_ext.fused_update(cfg, theta, state, params, mean_g, impl="reference")

    def body(p, s, g):
        g = jax.tree_util.tree_map(lambda x: x[0], g)  # this device's gradients
        return sharded.local_update(cfg, theta, s, p, g, param_specs=P(), grad_mean_axes=("data",))

    rep = jax.tree_util.tree_map(lambda _: P(), params)
    srep = jax.tree_util.tree_map(lambda _: P(), state)
    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(rep, srep, jax.tree_util.tree_map(lambda _: P("data"), params)),
                               out_specs=(rep, srep), check_vma=False))
    stacked = jax.device_put(stacked, NamedSharding(mesh, P("data")))
    got_p, got_s = fn(params, state, stacked)
    assert_trajectories_agree([got_p], [want_p], "params ")
    assert_trajectories_agree([got_s.m], [want_s.m], "m ")


def test_sharded_transform_optax_and_skip_nonfinite():
    """sharded_transform: optax updates equal the reference's; a NaN in ONE shard skips the
    step on every device (state.skipped counts it, params unchanged)."""
    cfg, theta, params, specs = _setup([((16, 8), P(("x", "y"), None)), ((8,), P("y"))], seed=5, hidden=4)
    tx = sharded.sharded_transform(cfg, theta, mesh=mesh2d(), param_specs=specs, skip_nonfinite=True)
    ref_tx = cfg.transform(theta, impl="reference")
    s, rs = tx.init(params), ref_tx.init(params)
    assert s.m["t0_16x8"].sharding.spec == P(("x", "y"), None, None)
    p = _put(params, specs, mesh2d())
    upd = jax.jit(tx.update)
    g = make_grads(params, 1)
    u, s = upd(_put(g, specs, mesh2d()), s, p)
    ru, rs = ref_tx.update(g, rs, params)
    assert_trajectories_agree([u], [ru], "updates ")
    bad = dict(g)
    bad["t0_16x8"] = g["t0_16x8"].copy()
    bad["t0_16x8"][13, 2] = np.nan  # lives on one device only
    u2, s2 = upd(_put(bad, specs, mesh2d()), s, p)
    assert int(s2.skipped) == 1 and int(s2.iteration) == 1
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree_util.tree_leaves(u2))
    np.testing.assert_array_equal(np.asarray(s2.m["t0_16x8"]), np.asarray(s.m["t0_16x8"]))


def test_pmap_population_es_estimate():
    """A population of antithetic pairs (each pair: theta +/- eps, two inner steps of the fused
    optimizer on a quadratic) split over 8 devices: per-member results and the pmean'd
    gradient estimate equal the single-device computation over the whole population."""
    cfg = lopt_ext.SmallFcLOpt(hidden_size=4)
    theta0 = cfg.init_theta(jax.random.PRNGKey(0))
    flat, unravel = jax.flatten_util.ravel_pytree(theta0)
    pairs, sigma = 16, 0.01
    eps = sigma * jax.random.normal(jax.random.PRNGKey(1), (pairs, flat.size))
    target = jax.random.normal(jax.random.PRNGKey(2), (pairs, 6, 4))
    p0 = {"w": jnp.zeros((6, 4)), "b": jnp.zeros((4,))}

    def member(theta_flat, tgt):
        th = unravel(theta_flat)
        p, s = p0, lopt_ext.init_state(cfg, p0)
        loss_fn = lambda p: jnp.mean((p["w"] - tgt) ** 2) + jnp.mean((p["b"] - 1.0) ** 2)
        for _ in range(2):
            g = jax.grad(loss_fn)(p)
            p, s = lopt_ext.fused_update(cfg, th, s, p, g)
        return loss_fn(p), p

    def chunk(theta_flat, eps, tgt):  # one device's pairs
        lp, pp = jax.vmap(member)(theta_flat[None] + eps, tgt)
        ln, _ = jax.vmap(member)(theta_flat[None] - eps, tgt)
        est = jnp.mean((lp - ln)[:, None] * eps, axis=0) / (2 * sigma ** 2)
        return (lp, ln, pp, jnp.stack([lp, ln])), est  # the last: population on axis 1

    mesh = jax.make_mesh((8,), ("pop",))
    fn = jax.jit(sharded.pmap_population(chunk, mesh=mesh, axis_name="pop", in_axes=(None, 0, 0),
                                         out_axes=(0, 0, 0, 1)))
    (lp, ln, pp, both), est = fn(flat, eps, target)
    (wlp, wln, wpp, wboth), west = jax.jit(chunk)(flat, eps, target)
    np.testing.assert_allclose(np.asarray(both), np.asarray(wboth), rtol=1e-6)
    assert both.sharding.spec == P(None, "pop")
    np.testing.assert_allclose(np.asarray(lp), np.asarray(wlp), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ln), np.asarray(wln), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(est), np.asarray(west), rtol=1e-4, atol=1e-6 * float(jnp.max(jnp.abs(west))))
    assert lp.sharding.spec == P("pop")
    assert len(est.sharding.device_set) == 8 and est.sharding.is_fully_replicated
    with pytest.raises(ValueError, match="not divisible"):
        sharded.pmap_population(chunk, mesh=mesh, axis_name="pop", in_axes=(None, 0, 0))(flat, eps[:12], target[:12])


def test_statistics_temporaries_are_bounded():
    """XLA's compiled temp memory per device for a 1M-element shard stays far below one
    float per element (chunked statistics): unchunked it was ~36 bytes per element."""
    mesh = jax.make_mesh((8,), ("fsdp",))
    cfg = lopt_ext.SmallFcLOpt(hidden_size=4)
    theta = cfg.init_theta(jax.random.PRNGKey(0))
    shape, spec = (8 * 4096, 256), P("fsdp", None)
    params = {"w": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, spec))}
    st_shard = sharded.state_shardings(cfg, params, {"w": spec}, mesh)
    state = jax.eval_shape(lambda: lopt_ext.init_state(cfg, params))
    state = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, st_shard)
    fn = jax.jit(lambda s, p, g: sharded.sharded_update(cfg, theta, s, p, g, mesh=mesh, param_specs={"w": spec}),
                 donate_argnums=(0, 1))
    mem = fn.lower(state, params, params).compile().memory_analysis()
    local = shape[0] * shape[1] // 8
    assert mem.temp_size_in_bytes < 4 * local, (mem.temp_size_in_bytes, local)  # bytes vs elements

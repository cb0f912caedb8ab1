"""small_fc_lopt on parameters sharded over a device mesh (jax.shard_map), exactly.

The learned optimizer normalises each feature by its root mean square over the WHOLE
tensor and factors g^2 into row/column means of the whole tensor, so a tensor split over
devices cannot just run the single-device kernel on each shard. Here a sharded tensor is
updated in two stages inside ``jax.shard_map``:

1. statistics: each device reduces its own shard (row/column sums of g^2 + 1e-30 in chunked
   jnp reductions, then the per-feature sums of squares: the compiled ``lopt_partial_sumsq``
   pass, or chunked jnp reductions with stats="jnp"; neither builds the params x 28 feature
   array), and ``lax.psum`` combines the partial sums over exactly the mesh axes that
   shard the reduced tensor axes. Only vectors of size rows, columns or 28 cross devices:
   no device ever gathers a tensor.
2. apply: the compiled apply-only kernel (``lopt_fused_apply``) runs on the local shard with
   the global statistics (the MLP, and the writes of p, m, rms, v).

Tensors that no mesh axis shards (replicated parameters: the data-parallel case, biases,
scalars) take the ordinary one-call fused kernel on every device: with the whole tensor
present, local statistics are global ones.

ScaledSmallFcLOpt's per-tensor step scale needs five more tensor-wide sums (p^2, each new
momentum squared, the new rms): each device sums its shard and they are psum'd the same way.

Public entry points:
- ``sharded_update(lopt, theta, state, params, grads, mesh=, param_specs=)``: a whole step,
  wrapping shard_map; call it inside or outside ``jax.jit``.
- ``local_update(...)``: the same step for code that is already inside its own shard_map
  (e.g. a data-parallel train step that computes local gradients; ``grad_mean_axes`` averages
  them first).
- ``sharded_transform(lopt, theta, mesh=, param_specs=)``: an optax GradientTransformation.
- ``state_specs`` / ``state_shardings``: where each optimizer-state leaf lives.
- ``pmap_population``: splits a population (PES members) over a mesh axis; estimates are
  averaged with ``lax.pmean``.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from lopt_ext import _ffi, reference
from lopt_ext.common import factored_dims, safe_rsqrt, step_features
from lopt_ext.config import SmallFcLOpt, SmallFcLOptState
from lopt_ext.state import init_state
from lopt_ext.update import (IMPLS, assemble, check_inputs, check_lopt, check_theta,
                              count_bad_grads)

P = PartitionSpec
STATS = ("kernel", "jnp")


# ----------------------------------------------------------------------------- specs

def _axis_names(entry) -> tuple:
    """Mesh axis names of one PartitionSpec entry (None, 'x' or ('x', 'y'))."""
    if entry is None:
        return ()
    if isinstance(entry, (tuple, list)):
        return tuple(entry)
    return (entry,)


def _entries(spec, ndim: int, where: str) -> list:
    if spec is None:
        spec = P()
    if not isinstance(spec, PartitionSpec):
        raise TypeError(f"{where}: expected a jax.sharding.PartitionSpec, got {type(spec).__name__}")
    entries = list(spec)
    if len(entries) > ndim:
        raise ValueError(f"{where}: PartitionSpec {spec} has {len(entries)} entries for a tensor of rank {ndim}")
    return entries + [None] * (ndim - len(entries))


def _flatten_specs(params, param_specs):
    """One PartitionSpec per params leaf (param_specs: a matching tree, or one spec for all)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if param_specs is None or isinstance(param_specs, PartitionSpec):
        return [param_specs] * len(leaves)
    is_spec = lambda x: x is None or isinstance(x, PartitionSpec)
    try:
        return treedef.flatten_up_to(param_specs)
    except (ValueError, TypeError):
        pass
    specs, spec_tree = jax.tree_util.tree_flatten(param_specs, is_leaf=is_spec)
    if spec_tree == treedef:
        return specs
    raise ValueError(f"param_specs must be a PartitionSpec or a tree matching params ({treedef}), got {param_specs}")


def _leaf_specs(lopt: SmallFcLOpt, shape, spec, where="param_specs"):
    """PartitionSpecs of (p, m, rms, v_row, v_col, v_full) for one parameter."""
    shape = tuple(shape)
    ent = _entries(spec, len(shape), where)
    dims = factored_dims(shape)
    p_spec = P(*ent)
    per_elem = P(*ent, None)
    if dims is None:
        v_row = v_col = P(None)  # the (0,) placeholders
        v_full = P(*ent, None) if shape else P(None)
        if not shape:
            per_elem = P(None)
    else:
        d1, d0 = dims
        v_row = P(*[e for i, e in enumerate(ent) if i != d0], None)
        v_col = P(*[e for i, e in enumerate(ent) if i != d1], None)
        v_full = P(None)
    return p_spec, per_elem, per_elem, v_row, v_col, v_full


def _check_divisible(mesh, shape, spec, where):
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    for ax, (n, entry) in enumerate(zip(shape, _entries(spec, len(shape), where))):
        names = _axis_names(entry)
        for name in names:
            if name not in sizes:
                raise ValueError(f"{where}: mesh has no axis {name!r} (axes {mesh.axis_names})")
        k = math.prod(sizes[nm] for nm in names)
        if n % k:
            raise ValueError(
                f"{where}: axis {ax} of shape {tuple(shape)} has size {n}, not divisible by the {k} devices of "
                f"mesh axes {names}; jax.shard_map needs even shards. Shard another axis, leave this one "
                f"replicated (None), or pad the parameter.")


def state_specs(lopt: SmallFcLOpt, params, param_specs) -> SmallFcLOptState:
    """PartitionSpecs of every optimizer-state leaf, given the parameters' specs.

    m and rms follow the parameter (plus a replicated decay axis); v_row drops the
    parameter's d0 entry, v_col its d1 entry (their own sharding is the parameter's minus
    the reduced axis); iteration/skipped are replicated.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    specs = _flatten_specs(params, param_specs)
    fields = [[], [], [], [], []]
    for leaf, spec in zip(leaves, specs):
        for f, s in zip(fields, _leaf_specs(lopt, jnp.shape(leaf), spec)[1:]):
            f.append(s)
    trees = [jax.tree_util.tree_unflatten(treedef, f) for f in fields]
    return SmallFcLOptState(P(), P(), *trees)


def state_shardings(lopt: SmallFcLOpt, params, param_specs, mesh) -> SmallFcLOptState:
    """NamedShardings of the optimizer state (for jit out_shardings / jax.device_put)."""
    specs = state_specs(lopt, params, param_specs)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))


def init_sharded_state(lopt: SmallFcLOpt, params, param_specs, mesh) -> SmallFcLOptState:
    """init_state created directly in its sharded layout (no device holds a whole state tensor)."""
    shardings = state_shardings(lopt, params, param_specs, mesh)
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), params)
    return jax.jit(lambda: init_state(lopt, shapes), out_shardings=shardings)()


# ----------------------------------------------------------------------------- statistics

def _psum(x, names):
    return lax.psum(x, tuple(names)) if names else x


def _sumsq(x, axes):
    return jnp.sum(jnp.square(x), axis=axes)


# Elements per chunk of the statistics loops. XLA:CPU materialises the operands of its
# reductions (g^2, the new m, rms, ...: ~10 floats per element), so the local shard is
# reduced in chunks along one axis: temporaries are O(CHUNK_ELEMENTS), not O(params).
CHUNK_ELEMENTS = 1 << 13


def _chunked(n, cs, body, init):
    """Folds body(lo, size, acc) over [0, n) in chunks of cs (static size; remainder last)."""
    nfull, rem = divmod(n, cs)
    acc = init
    if nfull == 1:
        acc = body(0, cs, acc)
    elif nfull > 1:
        acc = lax.fori_loop(0, nfull, lambda k, a: body(k * cs, cs, a), acc)
    if rem:
        acc = body(nfull * cs, rem, acc)
    return acc


def _sl(x, axis, lo, size):
    if isinstance(lo, int) and lo == 0 and size == x.shape[axis]:
        return x
    return lax.dynamic_slice_in_dim(x, lo, size, axis=axis)


def _front_sums(decays, p, g, m, rms, axes):
    """Sums of squares of features 1-6 (g, p, m, rms, m*rsqrt(rms), rsqrt(rms)) and the new m."""
    mom_b, rms_b, _ = decays
    rms_c = jnp.clip(rms_b, 0.0, 1.0)
    g2 = g * g
    m_new = mom_b * m + (1 - mom_b) * g[..., None]
    rms_new = rms_c * rms + (1 - rms_c) * g2[..., None]
    inv_rms = lax.rsqrt(rms_new + 1e-6)
    return [jnp.sum(g2)[None], jnp.sum(p * p)[None], _sumsq(m_new, axes), _sumsq(rms_new, axes),
            _sumsq(m_new * inv_rms, axes), _sumsq(inv_rms, axes)], m_new


def _geometry(p, ent):
    names = [_axis_names(e) for e in ent]
    c = int(np.argmax(p.shape))
    n_c = p.shape[c]
    cs = max(1, min(n_c, CHUNK_ELEMENTS // max(1, p.size // n_c)))
    return names, c, n_c, cs


def _stage1(decays, p, g, v_row, v_col, v_full, ent, global_shape):
    """Global factored statistics of one tensor from its local shard (inside shard_map).

    Returns (stats dict for _ffi.apply_leaves without "scales", local sums of squares of
    the four broadcast v features or None). For rank >= 2: row/column sums of g^2 + 1e-30
    over the shard (chunked along its longest axis), psum'd over the mesh axes sharding the
    reduced axis -> new v_row, v_col, row_col_mean (psum over d1's axes), factors.
    """
    fac_c = jnp.clip(decays[2], 0.0, 1.0)
    dims = factored_dims(global_shape)
    if dims is None:
        return {"v_full": v_full}, None
    d1, d0 = dims
    names, c, n_c, cs = _geometry(p, ent)
    pos = lambda red: c - 1 if c > red else c  # c's position once axis `red` is reduced

    def body(lo, size, acc):
        gc = _sl(g, c, lo, size)
        gsq = gc * gc + 1e-30
        out = []
        for red, a in zip((d0, d1), acc):
            part = jnp.sum(gsq, axis=red)
            out.append(a + part if c == red else lax.dynamic_update_slice_in_dim(a, part, lo, pos(red)))
        return tuple(out)

    shp = lambda red: tuple(n for i, n in enumerate(p.shape) if i != red)
    row_sum, col_sum = _chunked(n_c, cs, body, (jnp.zeros(shp(d0), jnp.float32), jnp.zeros(shp(d1), jnp.float32)))
    row_sum = _psum(row_sum, names[d0])
    col_sum = _psum(col_sum, names[d1])
    v_row = fac_c * v_row + (1 - fac_c) * (row_sum / global_shape[d0])[..., None]
    v_col = fac_c * v_col + (1 - fac_c) * (col_sum / global_shape[d1])[..., None]
    rd1 = d1 - 1 if d1 > d0 else d1  # d1's position in v_row
    rcm = _psum(jnp.sum(v_row, axis=rd1, keepdims=True), names[d1]) / global_shape[d1]
    st = {"axes": dims, "v_row": v_row, "v_col": v_col, "row_factor": safe_rsqrt(v_row / (rcm + 1e-9)),
          "col_factor": safe_rsqrt(v_col)}
    # v_row / v_col features repeat along the axis they were reduced over: count the local
    # length of that axis (the psum later adds the other devices' copies)
    n_d0, n_d1 = p.shape[d0], p.shape[d1]
    vr_axes = tuple(range(v_row.ndim - 1))
    vc_axes = tuple(range(v_col.ndim - 1))
    vsums = [n_d0 * _sumsq(v_row, vr_axes), n_d1 * _sumsq(v_col, vc_axes),
             n_d0 * _sumsq(lax.rsqrt(v_row + 1e-8), vr_axes), n_d1 * _sumsq(lax.rsqrt(v_col + 1e-8), vc_axes)]
    return st, vsums


def _stage2_jnp(decays, p, g, m, rms, st, ent):
    """Local sums of squares of the per-element features, in the kernel's compact order
    (g, p, m, rms, m*rsqrt(rms), rsqrt(rms), fac_g, fac_m[, v, rsqrt(v + 1e-8)]), by
    chunked jnp reductions (the kernel's lopt_partial_sumsq computes the same)."""
    fac_c = jnp.clip(decays[2], 0.0, 1.0)
    axes = tuple(range(p.ndim))
    _, c, n_c, cs = _geometry(p, ent)
    cut = lambda x, lo, size: _sl(x, c, lo, size)
    nfront = 2 + 2 * m.shape[-1] + 2 * rms.shape[-1]
    da = decays[2].shape[0]
    if "v_row" in st:
        d1, d0 = st["axes"]
        pos = lambda red: c - 1 if c > red else c

        def body(lo, size, acc):
            pc, gc, mc, rc_ = (cut(x, lo, size) for x in (p, g, m, rms))
            rf = st["row_factor"] if c == d0 else _sl(st["row_factor"], pos(d0), lo, size)
            cf = st["col_factor"] if c == d1 else _sl(st["col_factor"], pos(d1), lo, size)
            front, m_new = _front_sums(decays, pc, gc, mc, rc_, axes)
            rcf = jnp.expand_dims(rf, d0) * jnp.expand_dims(cf, d1)  # broadcasts to the chunk + [Da]
            return acc + jnp.concatenate(front + [_sumsq(gc[..., None] * rcf, axes), _sumsq(m_new * rcf, axes)])

        return _chunked(n_c, cs, body, jnp.zeros((nfront + 2 * da,), jnp.float32))

    def body(lo, size, acc):
        pc, gc, mc, rc_, vc = (cut(x, lo, size) for x in (p, g, m, rms, st["v_full"]))
        front, m_new = _front_sums(decays, pc, gc, mc, rc_, axes)
        v_new = fac_c * vc + (1 - fac_c) * (gc * gc + 1e-30)[..., None]
        return acc + jnp.concatenate(front + [
            _sumsq(gc[..., None] * safe_rsqrt(v_new + 1e-9), axes), _sumsq(m_new * (v_new + 1e-6) ** -0.5, axes),
            _sumsq(v_new, axes), _sumsq(lax.rsqrt(v_new + 1e-8), axes)])

    return _chunked(n_c, cs, body, jnp.zeros((nfront + 4 * da,), jnp.float32))


def _scales(compact, vsums, dm, dr, da, ent, global_shape):
    """Normalisation scales in reference feature order from local compact sums: psum over
    every mesh axis that shards the tensor, then rsqrt(1e-5 + mean square)."""
    nfront = 2 + 2 * dm + 2 * dr
    fac_g = compact[nfront:nfront + da]
    fac_m = compact[nfront + da:nfront + 2 * da]
    if vsums is not None:
        mid = vsums
    else:
        v, rv = compact[nfront + 2 * da:nfront + 3 * da], compact[nfront + 3 * da:]
        mid = [v, v, rv, rv]
    sums = jnp.concatenate([compact[:nfront], fac_g, *mid, fac_m])
    all_names = tuple(n for e in ent for n in _axis_names(e))
    total = _psum(sums, all_names)
    return lax.rsqrt(1e-5 + total / float(math.prod(global_shape)))


# ----------------------------------------------------------------------------- the step

def _global_shape(local_shape, ent):
    return tuple(int(n) * math.prod(lax.axis_size(nm) for nm in _axis_names(e))
                 for n, e in zip(local_shape, ent))


def local_update(lopt: SmallFcLOpt, theta, state: SmallFcLOptState, params, grads, *, param_specs,
                 impl: str = "fused", write_delta: bool = False, grad_mean_axes: Sequence[str] = (),
                 skip_nonfinite: bool = False, stats: str = "kernel"):
    """One step on LOCAL shards; call inside jax.shard_map over a mesh.

    param_specs: the PartitionSpec each parameter was sharded with (same tree as params, or
    one spec for all); the state must be sharded as ``state_specs`` says. grad_mean_axes:
    mesh axes over which the local gradients are averaged first (lax.pmean), e.g. ("data",)
    when each device computed gradients on its slice of the batch.
    stats: how sharded tensors' per-feature sums of squares are computed: "kernel" (the
    compiled lopt_partial_sumsq pass, default) or "jnp" (chunked XLA reductions); the
    reference impl always uses "jnp".
    Returns (new params, or updates when write_delta; new state), local shards.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if stats not in STATS:
        raise ValueError(f"stats must be one of {STATS}, got {stats!r}")
    if grad_mean_axes:
        grads = jax.tree_util.tree_map(lambda x: lax.pmean(x, tuple(grad_mean_axes)), grads)
    # shapes were checked on the global arrays (sharded_update); local shards may order
    # their axes by size differently, so only the tree structure is checked here
    _check_supported(lopt)
    check_theta(lopt, theta)
    p_leaves, treedef = jax.tree_util.tree_flatten(params)
    g_leaves = treedef.flatten_up_to(grads)
    fields = [treedef.flatten_up_to(getattr(state, f)) for f in SmallFcLOpt.state_fields]
    specs = _flatten_specs(params, param_specs)
    ents = [_entries(s, jnp.ndim(p), "param_specs") for s, p in zip(specs, p_leaves)]
    f32 = lambda x: jnp.asarray(x).astype(jnp.float32)
    live = [i for i, p in enumerate(p_leaves) if jnp.size(p) > 0]
    sharded = [i for i in live if any(_axis_names(e) for e in ents[i])]
    whole = [i for i in live if i not in sharded]
    all_names = tuple(sorted({n for e in ents for x in e for n in _axis_names(x)}))

    scaled = lopt.has_step_scales  # ScaledSmallFcLOpt: each tensor's step times its scale
    kernel_delta = write_delta or scaled  # the scaled rule needs the step itself

    def finish(out, p, scale):
        """The kernel's output (p_new, or -step with kernel_delta) after the tensor's scale."""
        if not scaled:
            return out
        return scale * out if write_delta else p + scale * out

    def step(_):
        res = {}
        if whole:  # every device holds these tensors entirely: the one-call kernel is exact
            leaves = [(f32(p_leaves[i]), f32(g_leaves[i]), *(f[i] for f in fields)) for i in whole]
            if impl == "fused":
                out = lopt.fused_leaves(theta, state.iteration, leaves, write_delta=kernel_delta)
            else:
                out = reference.step_leaves(lopt, theta, state.iteration, leaves)
                out = [((-s) if kernel_delta else (lf[0] - s), *rest) for (s, *rest), lf in zip(out, leaves)]
            if scaled:
                scales = lopt.step_scales(theta, state.iteration, leaves, [rest for _, *rest in out], impl=impl)
                out = [(finish(o, lf[0], c), *rest) for (o, *rest), lf, c in zip(out, leaves, scales)]
            res.update(zip(whole, out))
        if sharded:
            decays = lopt.decays(theta)
            dm, dr, da = lopt.num_decays
            items, extras = [], []
            for i in sharded:
                p, g = f32(p_leaves[i]), f32(g_leaves[i])
                m, rms, v_row, v_col, v_full = (f[i] for f in fields)
                gshape = _global_shape(p.shape, ents[i])
                st, vsums = _stage1(decays, p, g, v_row, v_col, v_full, ents[i], gshape)
                st["scales"] = jnp.zeros((lopt.num_features,), jnp.float32)  # not read by the sums
                items.append((p, g, m, rms, st))
                extras.append((vsums, gshape))
            if impl == "fused" and stats == "kernel":
                compact = _ffi.partial_sumsq_call(lopt.pack_theta(theta, state.iteration), items, lopt.kernel_attrs(), dm, dr, da)
            else:
                compact = [_stage2_jnp(decays, p, g, m, rms, st, ents[i])
                           for i, (p, g, m, rms, st) in zip(sharded, items)]
            for i, it, cs_, (vsums, gshape) in zip(sharded, items, compact, extras):
                it[4]["scales"] = _scales(cs_, vsums, dm, dr, da, ents[i], gshape)
            if impl == "fused":
                out = _ffi.apply_call(lopt.pack_theta(theta, state.iteration), items,
                                     lopt.kernel_attrs(), kernel_delta)
            else:
                out = [_apply_reference(lopt, theta, state.iteration, it, kernel_delta) for it in items]
            if scaled:  # the scale's tensor-wide sums: local sums, psum'd like the statistics
                scaled_out = []
                local_sums = lopt.scale_sums_leaves([(it[0], o[1], o[2]) for it, o in zip(items, out)], impl)
                for i, (p, *_), (o, m2, r2, vf), (_, gshape), su in zip(sharded, items, out, extras, local_sums):
                    names = tuple(n for e in ents[i] for n in _axis_names(e))
                    sums = _psum(su, names)
                    c = lopt.scale_from_sums(theta, state.iteration, sums, max(math.prod(gshape), 1))
                    scaled_out.append((finish(o, p, c), m2, r2, vf))
                out = scaled_out
            for i, (p, g, m, rms, st), (o, m2, r2, vf) in zip(sharded, items, out):
                if "v_row" in st:
                    res[i] = (o, m2, r2, st["v_row"], st["v_col"], fields[4][i])
                else:
                    res[i] = (o, m2, r2, fields[2][i], fields[3][i], vf)
        return [res[i] for i in live]

    def skip(_):
        return [((jnp.zeros_like(f32(p_leaves[i])) if write_delta else f32(p_leaves[i])),
                 *(f[i] for f in fields)) for i in live]

    finite = jnp.bool_(True)
    if skip_nonfinite and live:
        bad = count_bad_grads([g_leaves[i] for i in live])
        finite = _psum(bad, all_names) == 0  # every device takes the same branch
        results = lax.cond(finite, step, skip, None)
    else:
        results = step(None)
    return assemble(lopt, treedef, p_leaves, fields, live, results, finite, state, write_delta)


def _apply_reference(lopt, theta, iteration, item, write_delta):
    """Pure-JAX apply with external statistics (impl='reference': the same two-stage
    algorithm with the kernel replaced by jnp, so the statistics path is testable alone)."""
    p, g, m, rms, st = item
    mom_b, rms_b, fac_b = lopt.decays(theta)
    rms_c = jnp.clip(rms_b, 0.0, 1.0)
    fac_c = jnp.clip(fac_b, 0.0, 1.0)
    m2 = mom_b * m + (1 - mom_b) * g[..., None]
    r2 = rms_c * rms + (1 - rms_c) * (g * g)[..., None]
    inv = lax.rsqrt(r2 + 1e-6)
    feats = [g[..., None], p[..., None], m2, r2, m2 * inv, inv]
    vf = None
    if p.ndim >= 2:
        d1, d0 = st["axes"]
        rc = jnp.expand_dims(st["row_factor"], d0) * jnp.expand_dims(st["col_factor"], d1)
        full = p.shape + (st["v_row"].shape[-1],)
        vr = jnp.broadcast_to(jnp.expand_dims(st["v_row"], d0), full)
        vc = jnp.broadcast_to(jnp.expand_dims(st["v_col"], d1), full)
        feats += [g[..., None] * rc, vr, vc, lax.rsqrt(vr + 1e-8), lax.rsqrt(vc + 1e-8), m2 * rc]
    else:
        vf = fac_c * st["v_full"] + (1 - fac_c) * (g * g + 1e-30)[..., None]
        feats += [g[..., None] * safe_rsqrt(vf + 1e-9), vf, vf, lax.rsqrt(vf + 1e-8),
                  lax.rsqrt(vf + 1e-8), m2 * (vf + 1e-6) ** -0.5]
    x = jnp.concatenate(feats, axis=-1) * st["scales"]
    feat = step_features(iteration)
    x = jnp.concatenate([x, jnp.broadcast_to(feat, p.shape + feat.shape)], axis=-1)
    nn = theta["nn"]["~"]
    for i in range(lopt.hidden_layers + 1):
        x = jnp.matmul(x, nn[f"w{i}"], precision=lax.Precision.HIGHEST) + nn[f"b{i}"]
        if i < lopt.hidden_layers:
            x = jax.nn.relu(x)
    step = x[..., 0] * jnp.exp(x[..., 1] * lopt.exp_mult) * lopt.step_mult
    return ((-step) if write_delta else (p - step)), m2, r2, vf


def _place(tree, specs, mesh):
    return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs,
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))


def _in_specs(lopt, params, param_specs, mesh):
    leaves = jax.tree_util.tree_leaves(params)
    specs = _flatten_specs(params, param_specs)
    names = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, leaf), spec in zip(names, specs):
        _check_divisible(mesh, jnp.shape(leaf), spec, f"param_specs{jax.tree_util.keystr(path)}")
    treedef = jax.tree_util.tree_structure(params)
    p_specs = jax.tree_util.tree_unflatten(
        treedef, [P(*_entries(s, jnp.ndim(x), "param_specs")) for s, x in zip(specs, leaves)])
    return p_specs, state_specs(lopt, params, param_specs)


def sharded_update(lopt: SmallFcLOpt, theta, state: SmallFcLOptState, params, grads, *, mesh,
                   param_specs, impl: str = "fused", write_delta: bool = False,
                   skip_nonfinite: bool = False, stats: str = "kernel"):
    """(new_params, new_state) for one step on global arrays sharded as ``param_specs`` over ``mesh``.

    Equals fused_update on one device (to float32 round-off of the reductions); no tensor
    is gathered: only row/column sums and 28 feature sums per tensor are psum'd. The state
    must be laid out as ``state_specs`` (``init_sharded_state`` makes it so). Works inside
    jax.jit. Mesh axes that shard no parameter are replicated axes (data parallelism): the
    gradients passed here are global arrays, already averaged.
    """
    _check_supported(lopt)
    check_theta(lopt, theta)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    check_inputs(lopt, theta, state, params, grads)
    p_specs, s_specs = _in_specs(lopt, params, param_specs, mesh)
    theta_specs = jax.tree_util.tree_map(lambda _: P(), theta)
    body = functools.partial(local_update, lopt, impl=impl, write_delta=write_delta,
                             param_specs=p_specs, skip_nonfinite=skip_nonfinite, stats=stats)
    fn = jax.shard_map(lambda th, st, pa, gr: body(th, st, pa, gr), mesh=mesh,
                       in_specs=(theta_specs, s_specs, p_specs, p_specs),
                       out_specs=(p_specs, s_specs), check_vma=False)
    # a no-op for inputs already laid out as the specs say (the intended use); otherwise
    # the user's arrays are resharded first (explicit-axis meshes require matching layouts)
    args = [_place(x, sp, mesh) for x, sp in ((theta, theta_specs), (state, s_specs), (params, p_specs),
                                               (grads, p_specs))]
    return fn(*args)


def _check_supported(lopt) -> None:
    check_lopt(lopt)
    if not isinstance(lopt, SmallFcLOpt):
        raise NotImplementedError(f"{type(lopt).__name__}: the sharded path supports small_fc_lopt only")
    for flag in ("progress_inputs", "horizon_inputs", "loss_inputs"):
        if getattr(lopt, flag, None):
            raise NotImplementedError(f"{type(lopt).__name__}({flag}={getattr(lopt, flag)!r}): the sharded path "
                                      "supports small_fc_lopt and ScaledSmallFcLOpt without progress, horizon or "
                                      "loss inputs")
    if not lopt.has_adafactor:
        raise NotImplementedError("the sharded path needs the Adafactor features (initial_adafactor_decays "
                                  "is empty); use the unsharded fused_update or transform")


def sharded_transform(lopt: SmallFcLOpt, theta, *, mesh, param_specs, impl: str = "fused",
                      skip_nonfinite: bool = False, stats: str = "kernel"):
    """optax GradientTransformation running ``sharded_update`` (updates = -step).

    init places the state in its sharded layout; param_specs must describe the params
    passed to init/update (a tree of PartitionSpecs or a single spec).
    """
    _check_supported(lopt)
    check_theta(lopt, theta)

    def init_fn(params):
        return init_sharded_state(lopt, params, param_specs, mesh)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("small_fc_lopt reads the parameters: call tx.update(grads, state, params)")
        return sharded_update(lopt, theta, state, params, updates, mesh=mesh, param_specs=param_specs,
                              impl=impl, write_delta=True, skip_nonfinite=skip_nonfinite, stats=stats)

    return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------- populations

def pmap_population(chunk_fn: Callable, *, mesh, axis_name: str, in_axes, out_axes=0):
    """Spreads a population over the devices of mesh axis ``axis_name``.

    chunk_fn(*args) runs one device's chunk of the population and returns
    (per_member, estimate): per_member is a pytree whose leaves have the population axis at
    ``out_axes`` (an int, or one int per element when per_member is a tuple; stays sharded), estimate a pytree of that chunk's MEAN estimate (e.g. the
    PES gradient averaged over the chunk's members). in_axes: per argument, the population
    axis of every leaf of that argument (an int), or None for arguments every device needs
    whole (theta, the step counter, keys). The population size must divide evenly.

    Returns wrapped(*args) -> (per_member, estimate averaged over devices with lax.pmean),
    which equals the whole-population mean because chunks are equal in size.
    """
    n = dict(zip(mesh.axis_names, mesh.devices.shape))[axis_name]
    in_axes = tuple(in_axes)

    def spec_at(axis):
        if axis is None:
            return P()
        return P(*([None] * axis), axis_name)

    def wrapped(*args):
        if len(args) != len(in_axes):
            raise ValueError(f"pmap_population: got {len(args)} arguments for {len(in_axes)} in_axes")
        for k, (a, ax) in enumerate(zip(args, in_axes)):
            if ax is None:
                continue
            for leaf in jax.tree_util.tree_leaves(a):
                if jnp.shape(leaf)[ax] % n:
                    raise ValueError(f"pmap_population: argument {k} has population size {jnp.shape(leaf)[ax]} "
                                     f"on axis {ax}, not divisible by the {n} devices of mesh axis {axis_name!r}")
        in_specs = tuple(jax.tree_util.tree_map(lambda _, ax=ax: spec_at(ax), a) for a, ax in zip(args, in_axes))

        def body(*local):
            per_member, est = chunk_fn(*local)
            return per_member, jax.tree_util.tree_map(lambda e: lax.pmean(e, axis_name), est)

        out_shape = jax.eval_shape(chunk_fn, *args)  # only the tree structure is used
        if isinstance(out_axes, int):
            member_specs = jax.tree_util.tree_map(lambda _: spec_at(out_axes), out_shape[0])
        else:  # one axis per element of the per_member tuple
            if len(out_axes) != len(out_shape[0]):
                raise ValueError(f"pmap_population: out_axes has {len(out_axes)} entries, "
                                 f"chunk_fn returned {len(out_shape[0])} per-member outputs")
            member_specs = type(out_shape[0])(jax.tree_util.tree_map(lambda _, ax=ax: spec_at(ax), sub)
                                              for ax, sub in zip(out_axes, out_shape[0]))
        out_specs = (member_specs, jax.tree_util.tree_map(lambda _: P(), out_shape[1]))
        args = [_place(a, sp, mesh) for a, sp in zip(args, in_specs)]  # split the population
        return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)

    return wrapped

"""The apply-only kernel entry (statistics supplied from outside, as a sharded run
does after its psums) against the reference, with statistics from the reference."""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import lopt_ext
from lopt_ext import _ffi
from lopt_ext.common import leaf_features
from helpers import assert_trajectories_agree, make_grads, make_params


def _external_stats(cfg, theta, p, g, m, rms, v_row, v_col, v_full):
    x, m2, rms2, vr, vc, vf, rf, cf = leaf_features(cfg, cfg.decays(theta), p, g, m, rms, v_row, v_col, v_full)
    scales = lax.rsqrt(1e-5 + jnp.mean(jnp.square(x), axis=tuple(range(p.ndim))))
    if p.ndim >= 2:
        return {"axes": lopt_ext.factored_dims(p.shape), "v_row": vr, "v_col": vc,
                "row_factor": rf, "col_factor": cf, "scales": scales}
    return {"v_full": v_full, "scales": scales}


def test_apply_with_external_stats_matches_reference():
    cfg = lopt_ext.SmallFcLOpt(hidden_size=8)
    theta = cfg.init_theta(jax.random.PRNGKey(0))
    params = make_params([(7,), (5, 3), (3, 5), (4, 3, 2), (2, 1, 6), (40, 30)], seed=3)
    state = lopt_ext.init_state(cfg, params)
    for i in range(2):  # non-zero accumulators
        _, state = lopt_ext.fused_update(cfg, theta, state, params, make_grads(params, i), impl="reference")
    grads = make_grads(params, 5)
    ref_p, ref_s = lopt_ext.fused_update(cfg, theta, state, params, grads, impl="reference")
    names = list(params)
    leaves = []
    for k in names:
        st = _external_stats(cfg, theta, params[k], grads[k], state.m[k], state.rms[k],
                             state.v_row[k], state.v_col[k], state.v_full[k])
        leaves.append((params[k], grads[k], state.m[k], state.rms[k], st))
    out = _ffi.apply_call(cfg.pack_theta(theta, state.iteration), leaves, cfg.kernel_attrs(), False)
    got = {k: o[0] for k, o in zip(names, out)}
    got_m = {k: o[1] for k, o in zip(names, out)}
    assert_trajectories_agree([got], [ref_p], "params ")
    assert_trajectories_agree([got_m], [ref_s.m], "m ")
    for k, o in zip(names, out):
        if params[k].ndim < 2:
            np.testing.assert_allclose(np.asarray(o[3]), np.asarray(ref_s.v_full[k]), rtol=1e-6)

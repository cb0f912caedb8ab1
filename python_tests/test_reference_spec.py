"""The reference checked against a hand-written float64 transcription of the spec.

The transcription below uses explicit loops over elements and never calls lopt_ext,
so a mistake in the reference (feature order, axes, epsilons, decays) shows here.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lopt_ext
from lopt_ext import reference

TIMESCALES = [1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000]


def spec_decay(beta0, offset):
    return 1.0 - (1.0 - beta0) * np.exp(10.0 * offset)


def spec_step(theta, cfg, p, g, m, rms, vr, vc, vf, iteration):
    """One step for a tensor of rank 1 or 2 (no axis juggling needed), float64."""
    bm = spec_decay(np.array(cfg.initial_momentum_decays), np.asarray(theta["momentum_decays"], np.float64))
    br = np.clip(spec_decay(np.array(cfg.initial_rms_decays), np.asarray(theta["rms_decays"], np.float64)), 0, 1)
    ba = np.clip(spec_decay(np.array(cfg.initial_adafactor_decays), np.asarray(theta["adafactor_decays"], np.float64)), 0, 1)
    p, g = np.asarray(p, np.float64), np.asarray(g, np.float64)
    m = bm * m + (1 - bm) * g[..., None]
    rms = br * rms + (1 - br) * (g ** 2)[..., None]
    gsq = g ** 2 + 1e-30
    feats = []  # list of per-element feature lists
    if p.ndim == 2:
        n0, n1 = p.shape
        # d0 = largest axis (later one on ties), d1 = the other
        d0 = 1 if n1 >= n0 else 0
        d1 = 1 - d0
        new_vr = np.empty_like(vr)
        new_vc = np.empty_like(vc)
        # v_row drops d0: indexed by the d1 coordinate; v_col drops d1: indexed by d0 coordinate
        for idx in range(p.shape[d1]):
            sl = gsq[idx, :] if d1 == 0 else gsq[:, idx]
            new_vr[idx] = ba * vr[idx] + (1 - ba) * sl.mean()
        for idx in range(p.shape[d0]):
            sl = gsq[idx, :] if d0 == 0 else gsq[:, idx]
            new_vc[idx] = ba * vc[idx] + (1 - ba) * sl.mean()
        vr, vc = new_vr, new_vc
        rc_mean = vr.mean(axis=0)
        safe = lambda x: 1 / np.sqrt(np.maximum(x, 1e-9))
        for i in range(n0):
            for j in range(n1):
                r_i = (i, j)[d1]
                c_i = (i, j)[d0]
                rf = safe(vr[r_i] / (rc_mean + 1e-9))
                cf = safe(vc[c_i])
                rs = 1 / np.sqrt(rms[i, j] + 1e-6)
                feats.append([g[i, j], p[i, j], *m[i, j], *rms[i, j], *(m[i, j] * rs), *rs,
                              *(g[i, j] * rf * cf), *vr[r_i], *vc[c_i], *(1 / np.sqrt(vr[r_i] + 1e-8)),
                              *(1 / np.sqrt(vc[c_i] + 1e-8)), *(m[i, j] * rf * cf)])
    else:
        vf = ba * vf + (1 - ba) * gsq[..., None]
        for i in range(p.shape[0]):
            rs = 1 / np.sqrt(rms[i] + 1e-6)
            v = vf[i]
            feats.append([g[i], p[i], *m[i], *rms[i], *(m[i] * rs), *rs,
                          *(g[i] / np.sqrt(np.maximum(v + 1e-9, 1e-9))), *v, *v,
                          *(1 / np.sqrt(v + 1e-8)), *(1 / np.sqrt(v + 1e-8)), *(m[i] / np.sqrt(v + 1e-6))])
    x = np.array(feats)  # [n, 28]
    x = x / np.sqrt(1e-5 + np.mean(x ** 2, axis=0))
    t = np.tanh(iteration / np.array(TIMESCALES, np.float64) - 1)
    x = np.concatenate([x, np.broadcast_to(t, (x.shape[0], 11))], axis=1)
    nn = {k: np.asarray(v, np.float64) for k, v in theta["nn"]["~"].items()}
    for layer in range(cfg.hidden_layers + 1):
        x = x @ nn[f"w{layer}"] + nn[f"b{layer}"]
        if layer < cfg.hidden_layers:
            x = np.maximum(x, 0)
    step = x[:, 0] * np.exp(x[:, 1] * cfg.exp_mult) * cfg.step_mult
    return p - step.reshape(p.shape), m, rms, vr, vc, vf


@pytest.mark.parametrize("shape", [(3,), (2, 3), (4, 2), (3, 3)])
def test_reference_matches_spec_transcription(shape):
    cfg = lopt_ext.SmallFcLOpt(hidden_size=4, hidden_layers=2, exp_mult=0.3, step_mult=0.01)
    theta = cfg.init_theta(jax.random.PRNGKey(3))
    # Non-zero decay offsets and biases exercise every term.
    theta["momentum_decays"] = jnp.array([0.05, -0.1, 0.02], jnp.float32)
    theta["rms_decays"] = jnp.array([0.03], jnp.float32)
    theta["adafactor_decays"] = jnp.array([-0.04, 0.06, 0.01], jnp.float32)
    theta["nn"]["~"]["b0"] = jnp.linspace(-0.2, 0.3, 4, dtype=jnp.float32)
    theta["nn"]["~"]["b2"] = jnp.array([0.05, -0.5], jnp.float32)
    rng = np.random.default_rng(0)
    p = rng.normal(size=shape).astype(np.float32)
    g = rng.normal(size=shape).astype(np.float32)
    state = lopt_ext.init_state(cfg, p)
    # A non-zero starting state, shaped as the reference keeps it.
    fill = lambda x: np.abs(rng.normal(size=np.shape(x))).astype(np.float32) * 0.1 if np.size(x) else np.asarray(x)
    state = state._replace(m=fill(state.m) - 0.05, rms=fill(state.rms), v_row=fill(state.v_row),
                           v_col=fill(state.v_col), v_full=fill(state.v_full), iteration=jnp.int32(7))
    new_p, new_state = lopt_ext.fused_update(cfg, theta, state, jnp.asarray(p), jnp.asarray(g), impl="reference")
    want = spec_step(theta, cfg, p, g, *(np.asarray(x, np.float64) for x in
                     (state.m, state.rms, state.v_row, state.v_col, state.v_full)), 7)
    got = (new_p, new_state.m, new_state.rms, new_state.v_row, new_state.v_col, new_state.v_full)
    for name, a, b in zip(["params", "m", "rms", "v_row", "v_col", "v_full"], got, want):
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=2e-5, atol=1e-7, err_msg=name)
    # The step itself must match too, not only p (whose rounding hides small steps).
    tx = cfg.transform(theta, impl="reference")
    updates, _ = tx.update(jnp.asarray(g), state, jnp.asarray(p))
    step_scale = np.max(np.abs(want[0] - p))
    np.testing.assert_allclose(np.asarray(updates, np.float64), want[0] - p, rtol=1e-4,
                               atol=1e-5 * step_scale)
    assert int(new_state.iteration) == 8


@pytest.mark.parametrize("shape", [(5,), (3, 4)])
def test_no_adafactor_reference_matches_transcription(shape):
    """The ablation without Adafactor features: per element g, p, m[3], rms, m*rsqrt(rms+1e-6),
    rsqrt(rms+1e-6) (10 features), nothing else, and no second-moment accumulators."""
    cfg = lopt_ext.SmallFcLOpt(hidden_size=4, initial_adafactor_decays=(), exp_mult=0.3, step_mult=0.01)
    assert cfg.num_features == 10 and cfg.num_inputs == 21
    theta = cfg.init_theta(jax.random.PRNGKey(5))
    theta["momentum_decays"] = jnp.array([0.05, -0.1, 0.02], jnp.float32)
    theta["nn"]["~"]["b0"] = jnp.linspace(-0.2, 0.3, 4, dtype=jnp.float32)
    rng = np.random.default_rng(1)
    p = rng.normal(size=shape).astype(np.float32)
    g = rng.normal(size=shape).astype(np.float32)
    m0 = (0.1 * rng.normal(size=shape + (3,))).astype(np.float32)
    r0 = (0.1 * np.abs(rng.normal(size=shape + (1,)))).astype(np.float32)
    state = lopt_ext.init_state(cfg, p)._replace(m=jnp.asarray(m0), rms=jnp.asarray(r0), iteration=jnp.int32(7))
    updates, new_state = cfg.transform(theta, impl="reference").update(jnp.asarray(g), state, jnp.asarray(p))
    bm = spec_decay(np.array(cfg.initial_momentum_decays), np.asarray(theta["momentum_decays"], np.float64))
    br = np.clip(spec_decay(np.array(cfg.initial_rms_decays), np.asarray(theta["rms_decays"], np.float64)), 0, 1)
    pf, gf = p.reshape(-1).astype(np.float64), g.reshape(-1).astype(np.float64)
    m = bm * m0.reshape(-1, 3) + (1 - bm) * gf[:, None]
    rms = br * r0.reshape(-1, 1) + (1 - br) * gf[:, None] ** 2
    feats = []
    for i in range(pf.size):
        rs = 1 / np.sqrt(rms[i] + 1e-6)
        feats.append([gf[i], pf[i], *m[i], *rms[i], *(m[i] * rs), *rs])
    x = np.array(feats)
    x = x / np.sqrt(1e-5 + np.mean(x ** 2, axis=0))
    x = np.concatenate([x, np.broadcast_to(np.tanh(7 / np.array(TIMESCALES, np.float64) - 1), (pf.size, 11))], 1)
    nn = {k: np.asarray(v, np.float64) for k, v in theta["nn"]["~"].items()}
    for layer in range(3):
        x = x @ nn[f"w{layer}"] + nn[f"b{layer}"]
        x = np.maximum(x, 0) if layer < 2 else x
    step = x[:, 0] * np.exp(x[:, 1] * 0.3) * 0.01
    np.testing.assert_allclose(np.asarray(updates, np.float64).reshape(-1), -step, rtol=1e-4,
                               atol=1e-5 * np.max(np.abs(step)))
    np.testing.assert_allclose(np.asarray(new_state.m).reshape(-1, 3), m, rtol=2e-5, atol=1e-7)
    assert new_state.v_row.shape == new_state.v_col.shape == new_state.v_full.shape == (0,)


def test_factored_dims_rule():
    assert lopt_ext.factored_dims((10, 10)) == (0, 1)
    assert lopt_ext.factored_dims((4, 3, 2)) == (1, 0)
    assert lopt_ext.factored_dims((2, 1, 6)) == (0, 2)
    assert lopt_ext.factored_dims((5, 3, 5)) == (0, 2)
    assert lopt_ext.factored_dims((7,)) is None


def test_default_feature_count():
    cfg = lopt_ext.SmallFcLOpt()
    assert cfg.num_features == 28 and cfg.num_inputs == 39
    assert cfg.theta_shapes()["nn"]["~"]["w0"] == (39, 4)

"""Determinism: bit-identical outputs across runs, processes and thread counts; every
instruction-set build of the CPU loops agrees with the reference.

Thread counts: fresh interpreters (started without fork) with XLA's intra-op pool restricted by
CPU affinity (the child's sched_setaffinity before it imports jax: 1 CPU, 2 CPUs, all) and with
XLA_FLAGS=--xla_cpu_multi_thread_eigen=false. csrc/tests/lopt_kernel_test.cc checks
1/2/3/8 threads and a reversed task order directly on the kernel.
"""
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lopt_ext
from lopt_ext import _ffi
from helpers import assert_trajectories_agree, make_grads, make_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Inputs: several chunks per tensor (pass B/C split at 16384 elements), factored tensors with
# many line blocks, rank 3/4, scalars, and denormal / zero / huge gradients (flush-to-zero
# settings that differ between threads would show up here).
_SCRIPT = textwrap.dedent("""
    import hashlib, json, os, sys
    if os.environ.get("LOPT_TEST_CPUS"):  # before jax starts: XLA sizes its thread pool from the affinity
        os.sched_setaffinity(0, {{int(c) for c in os.environ["LOPT_TEST_CPUS"].split(",")}})
    sys.path.insert(0, {root!r})
    sys.path.insert(0, os.path.join({root!r}, "python_tests"))
    import jax, jax.numpy as jnp, numpy as np
    import lopt_ext
    from helpers import make_grads, make_params
    def inputs():
        cfg = lopt_ext.SmallFcLOpt(hidden_size=8)
        theta = cfg.init_theta(jax.random.PRNGKey(1))
        params = make_params([(300, 517), (70001,), (9, 8, 70), (3, 4, 5, 6), (), (1, 1)], seed=2)
        grads = make_grads(params, 3)
        grads["t1_70001"] = grads["t1_70001"].at[::7].set(1e-41).at[1::7].set(0.0).at[2::11].set(3e18)
        grads["t0_300x517"] = grads["t0_300x517"].at[::5, ::3].multiply(1e-38)
        return cfg, theta, params, grads
    cfg, theta, params, grads = inputs()
    step = jax.jit(lambda s, p, g: lopt_ext.fused_update(cfg, theta, s, p, g))
    state = lopt_ext.init_state(cfg, params)
    digests = []
    for run in range(2):
        p, s = params, state
        h = hashlib.sha256()
        for i in range(3):
            p, s = step(s, p, grads)
            for leaf in jax.tree_util.tree_leaves((p, s)):
                h.update(np.asarray(leaf).tobytes())
        digests.append(h.hexdigest())
    print(json.dumps({{"digests": digests, "cpus": len(os.sched_getaffinity(0)),
                      "isa": lopt_ext._ffi.cpu_isa()}}))
""").format(root=ROOT)


def _run(env_extra=None, cpus=None):
    env = dict(os.environ)
    env.pop("LOPT_CPU_ISA", None)
    env.update(env_extra or {})
    if cpus is not None:
        env["LOPT_TEST_CPUS"] = ",".join(str(c) for c in sorted(cpus))
    # No preexec_fn: it would make subprocess fork() this process, whose JAX threads are running
    # (JAX warns that this can deadlock); the child restricts its own affinity instead.
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_bitwise_identical_across_processes_and_thread_counts():
    all_cpus = sorted(os.sched_getaffinity(0))
    runs = {"default": _run(), "one_cpu": _run(cpus={all_cpus[0]}),
            "no_eigen_threads": _run({"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"})}
    if len(all_cpus) > 2:
        runs["two_cpus"] = _run(cpus=set(all_cpus[:2]))
    assert runs["one_cpu"]["cpus"] == 1
    digests = {name: r["digests"] for name, r in runs.items()}
    for name, d in digests.items():
        assert d[0] == d[1], f"{name}: two runs in one process differ"
    first = digests["default"][0]
    assert all(d[0] == first for d in digests.values()), digests


def _isa_inputs():
    cfg = lopt_ext.SmallFcLOpt(hidden_size=16)
    theta = cfg.init_theta(jax.random.PRNGKey(4))
    theta["nn"]["~"]["b0"] = jnp.linspace(-0.2, 0.2, 16)
    params = make_params([(130, 70), (1000,), (5, 6, 7), (), (2, 33)], seed=5)
    return cfg, theta, params, make_grads(params, 6)


ISAS = ["generic", "avx2", "avx512"]


@pytest.mark.parametrize("isa", ISAS)
def test_each_isa_matches_reference_and_is_deterministic(isa, monkeypatch):
    monkeypatch.setenv("LOPT_CPU_ISA", isa)
    if _ffi.cpu_isa() != isa:
        pytest.skip(f"this CPU lacks {isa}")
    cfg, theta, params, grads = _isa_inputs()
    state = lopt_ext.init_state(cfg, params)
    fused = jax.jit(lambda s, p, g: lopt_ext.fused_update(cfg, theta, s, p, g))
    ref = jax.jit(lambda s, p, g: lopt_ext.fused_update(cfg, theta, s, p, g, impl="reference"))
    got, want = [], []
    p_f, s_f = params, state
    for i in range(5):
        g = make_grads(p_f, 10 + i)
        want.append(ref(s_f, p_f, g))  # one step of the reference from the fused trajectory
        p_f, s_f = fused(s_f, p_f, g)
        got.append((p_f, s_f))
    assert_trajectories_agree(got, want, f"{isa} ")
    again = fused(state, params, make_grads(params, 10))
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(got[0])):
        assert np.array_equal(np.asarray(a), np.asarray(b)), f"{isa}: a rerun differs"


def test_isa_builds_against_each_other(monkeypatch):
    """The builds may differ by round-off (FMA contraction), never more than the spec's bar."""
    cfg, theta, params, grads = _isa_inputs()
    state = lopt_ext.init_state(cfg, params)
    outs = {}
    for isa in ISAS:
        monkeypatch.setenv("LOPT_CPU_ISA", isa)
        if _ffi.cpu_isa() == isa:
            # eager: the ISA is read when the kernel runs, so one jit cache entry would do too
            outs[isa] = lopt_ext.fused_update(cfg, theta, state, params, grads)
    if len(outs) < 2:
        pytest.skip("only one instruction set on this CPU")
    base = outs["generic"]
    for isa, out in outs.items():
        assert_trajectories_agree([out], [base], f"{isa} vs generic ")

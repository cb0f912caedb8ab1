"""Concurrency: Python threads calling the fused update at the same time get exactly the
results of sequential calls (jitted and eager, same and different configurations)."""
import threading

import jax
import numpy as np

import lopt_ext
from helpers import make_grads, make_params


def _bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(tree)]


def _run_concurrently(jobs, rounds=4):
    """Runs every job in its own thread, all released by one barrier, `rounds` times."""
    results = [[None] * len(jobs) for _ in range(rounds)]
    errors = []
    barrier = threading.Barrier(len(jobs))

    def worker(k):
        try:
            for r in range(rounds):
                barrier.wait(timeout=120)
                results[r][k] = _bits(jobs[k]())
        except Exception as e:  # surfaced below with the thread's index
            errors.append((k, repr(e)))
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    return results


def _problem(cfg, seed, shapes):
    theta = cfg.init_theta(jax.random.PRNGKey(seed))
    params = make_params(shapes, seed=seed)
    grads = make_grads(params, seed + 1)
    state = lopt_ext.init_state(cfg, params)
    return theta, state, params, grads


def test_two_threads_same_jitted_function():
    cfg = lopt_ext.SmallFcLOpt(hidden_size=8)
    shapes = [(200, 300), (5000,), (4, 5, 6), ()]
    step = jax.jit(lambda t, s, p, g: lopt_ext.fused_update(cfg, t, s, p, g))
    problems = [_problem(cfg, 10 * k, shapes) for k in range(2)]
    sequential = [_bits(step(*pr)) for pr in problems]
    results = _run_concurrently([lambda pr=pr: step(*pr) for pr in problems])
    for r in results:
        assert r == sequential, "a concurrent call differs from the sequential result"
    # and they are correct, not merely equal: the reference agrees
    ref = lopt_ext.fused_update(cfg, *problems[0], impl="reference")
    got = step(*problems[0])
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_threads_with_different_configs_and_eager_calls():
    cfg_a = lopt_ext.SmallFcLOpt()
    cfg_b = lopt_ext.SmallFcLOpt(hidden_size=16, hidden_layers=3, initial_momentum_decays=(0.5, 0.9),
                                 initial_rms_decays=(0.99,), initial_adafactor_decays=(0.6, 0.95))
    pa = _problem(cfg_a, 1, [(64, 33), (17,)])
    pb = _problem(cfg_b, 2, [(50, 40, 3), (1,)])
    step_a = jax.jit(lambda t, s, p, g: lopt_ext.fused_update(cfg_a, t, s, p, g))
    eager_b = lambda: lopt_ext.fused_update(cfg_b, *pb)
    tx = cfg_a.transform(pa[0], skip_nonfinite=True)
    tx_up = jax.jit(tx.update)
    jobs = [lambda: step_a(*pa), eager_b, lambda: tx_up(pa[3], pa[1], pa[2])]
    sequential = [_bits(j()) for j in jobs]
    for r in _run_concurrently(jobs, rounds=3):
        assert r == sequential

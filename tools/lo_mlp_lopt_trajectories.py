"""Records trajectories of learned_optimization's own MLPLOpt for python_tests/test_mlp_lopt.py.

learned_optimization is not a dependency of lopt_ext; this script runs once, in an environment
that has it, and writes python_tests/data/lo_mlp_lopt_trajectories.npz (numbers only). It was
run with jax 0.10.2, dm-haiku 0.0.17, flax 0.12.8, gin-config 0.5.0 and the learned_optimization
0.0.1 wheel from PyPI on the path:

    python -m venv --system-site-packages /tmp/lovenv
    /tmp/lovenv/bin/pip install flax gin-config dm-haiku absl-py
    pip download --no-deps -d /tmp/pk learned_optimization && unzip /tmp/pk/*.whl -d /tmp/pk/lo
    PYTHONPATH=/tmp/pk/lo /tmp/lovenv/bin/python tools/lo_mlp_lopt_trajectories.py

Its summary module imports TensorFlow only to write TensorBoard summaries, which MLPLOpt does
not need here (compute_summary=False), so TensorFlow is replaced by an empty module, and jax's
old top-level tree functions (removed since) are pointed at jax.tree_util.
Cases: hidden sizes (32, 2 layers) and (4, 1), theta from MLPLOpt.init and perturbed by
0.3 * N(0, 1), gradients of scale 1 and 1e-6, tensors of rank 0 to 4, 30 steps.
"""
import os

import numpy as np

import lo_compat  # noqa: E402,F401  (before learned_optimization: see tools/lo_compat.py)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from learned_optimization.learned_optimizers import mlp_lopt  # noqa: E402

SHAPES = [(), (1,), (7,), (5, 3), (4, 3, 2), (2, 1, 6), (3, 4, 5, 2)]
STEPS = 30
M_STEPS = (0, 4, 9, 19, 29)  # steps whose momenta are stored (all params are)
CASES = [(32, 2, 0.0, 1.0), (32, 2, 0.3, 1.0), (32, 2, 0.3, 1e-6), (4, 1, 0.3, 1.0), (4, 1, 0.0, 1e-6)]
OUT = os.path.join(os.path.dirname(__file__), "..", "python_tests", "data", "lo_mlp_lopt_trajectories.npz")


def main():
    rng = np.random.default_rng(0)
    arrays = {"shapes": np.array([str(s) for s in SHAPES])}
    for c, (hidden, layers, scale, grad_scale) in enumerate(CASES):
        lo = mlp_lopt.MLPLOpt(hidden_size=hidden, hidden_layers=layers, compute_summary=False)
        theta = lo.init(jax.random.PRNGKey(c))
        theta = jax.tree_util.tree_map(
            lambda x: np.asarray(x + scale * rng.standard_normal(x.shape), np.float32), theta)
        params = {str(i): rng.standard_normal(s).astype(np.float32) for i, s in enumerate(SHAPES)}
        grads = [{k: (grad_scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in params.items()}
                 for _ in range(STEPS)]
        opt = lo.opt_fn(theta)
        state = opt.init({k: jnp.asarray(v) for k, v in params.items()})
        update = jax.jit(lambda st, g: opt.update(st, g, loss=jnp.float32(0.0)))
        p_traj, m_traj = [], []
        for t in range(STEPS):
            state = update(state, grads[t])
            p_traj.append({k: np.asarray(v) for k, v in state.params.items()})
            m_traj.append({k: np.asarray(v) for k, v in state.rolling_features.m.items()})
        pre = f"case{c}/"
        arrays[pre + "config"] = np.array([hidden, layers, scale, grad_scale], np.float64)
        for lname, layer in theta.items():
            for wname, w in layer.items():
                arrays[pre + f"theta/{lname}/{wname}"] = w
        for k in params:
            arrays[pre + f"p0/{k}"] = params[k]
            arrays[pre + f"grads/{k}"] = np.stack([g[k] for g in grads])
            arrays[pre + f"p/{k}"] = np.stack([p[k] for p in p_traj])
            arrays[pre + f"m/{k}"] = np.stack([m_traj[t][k] for t in M_STEPS])
    arrays["m_steps"] = np.array(M_STEPS)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({os.path.getsize(OUT) / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()

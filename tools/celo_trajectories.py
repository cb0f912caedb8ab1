"""Records trajectories of Celo's own code for python_tests/test_celo.py.

Celo (github amoudgl/celo, MIT) is not a dependency of lopt_ext; this script runs once, in an
environment that has its dependencies, and writes python_tests/data/celo_trajectories.npz
(numbers only). It was run with jax 0.10.2, dm-haiku 0.0.17, flax 0.12.8, chex 0.1.92,
gin-config 0.5.0, the learned_optimization 0.0.1 wheel from PyPI and Celo's repository
(commit 66d9761) on the path:

    python -m venv --system-site-packages /tmp/lovenv
    /tmp/lovenv/bin/pip install flax gin-config dm-haiku absl-py chex
    pip download --no-deps -d /tmp/pk learned_optimization && unzip /tmp/pk/*.whl -d /tmp/pk/lo
    git clone https://github.com/amoudgl/celo /tmp/celo   # (or any checkout of it)
    PYTHONPATH=/tmp/pk/lo:/tmp/celo /tmp/lovenv/bin/python tools/celo_trajectories.py THETA_STATE

THETA_STATE is Celo's published theta.state; it is read with flax's own msgpack loader here (not
lopt_ext's). The factory's "celo" configuration is built as Celo's factory.py builds it.
learned_optimization's summary module imports TensorFlow only for TensorBoard summaries, which
are not written here, so TensorFlow is replaced by an empty module, and jax's old top-level tree
functions are pointed at jax.tree_util.
Cases: the published theta and a perturbed one, gradients of scale 1, 3000 (past Celo's
+-1000 clip) and 1e-4, tensors of rank 0 to 4, losses of a noisy decreasing curve with jumps,
horizons shorter and longer than the 30 steps run.
"""
import os
import sys

import numpy as np

import lo_compat  # noqa: E402,F401  (before learned_optimization: see tools/lo_compat.py)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import flax.serialization  # noqa: E402
from celo.optimizers import celo as celo_lopt  # noqa: E402

SHAPES = [(), (1,), (7,), (5, 3), (4, 3, 2), (2, 1, 6), (3, 4, 5, 2)]
STEPS = 30
M_STEPS = (0, 4, 9, 19, 29)  # steps whose state is stored (all params are)
# (theta perturbation, gradient scale, num_steps). The perturbation is 0.3 N(0, 1) on the
# per-element MLP and a sixth of that on the scheduler: 0.3 on a 64-unit LSTM makes it amplify
# float32 round-off about 100x in 5 steps, which tests chaos rather than the rule.
CASES = [(0.0, 1.0, 40), (0.3, 3000.0, 20), (0.0, 1e-4, 1000)]
RNN_PERTURBATION = 1 / 6
OUT = os.path.join(os.path.dirname(__file__), "..", "python_tests", "data", "celo_trajectories.npz")


def flat(tree, prefix):
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        out[prefix + key] = np.asarray(leaf)
    return out


def main(theta_path):
    lo = celo_lopt.Celo(lstm_hidden_size=64, initial_momentum_decays=(0.9, 0.99, 0.999),
                        initial_rms_decays=(0.999,), initial_adafactor_decays=(0.9, 0.99, 0.999),
                        param_inits=1, train_phase=2, summarize_each_layer=False)
    template = lo.init(jax.random.PRNGKey(0))
    with open(theta_path, "rb") as f:
        published = flax.serialization.from_bytes(template, f.read())
    rng = np.random.default_rng(0)
    arrays = {"shapes": np.array([str(s) for s in SHAPES]), "m_steps": np.array(M_STEPS)}
    for c, (scale, grad_scale, num_steps) in enumerate(CASES):
        theta = {k: jax.tree_util.tree_map(
            lambda x: np.asarray(x + s * rng.standard_normal(x.shape), np.float32), v)
            for k, v, s in ((k, v, scale if k == "ff_mod_stack" else scale * RNN_PERTURBATION)
                            for k, v in published.items())}
        params = {str(i): rng.standard_normal(s).astype(np.float32) for i, s in enumerate(SHAPES)}
        grads = [{k: (grad_scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in params.items()}
                 for _ in range(STEPS)]
        t = np.arange(STEPS)
        losses = (3.0 * np.exp(-t / 10) + 0.2 * rng.standard_normal(STEPS) + 5.0 * (t == 12)).astype(np.float32)
        opt = lo.opt_fn(theta)
        state = opt.init({k: jnp.asarray(v) for k, v in params.items()}, num_steps=num_steps)
        update = jax.jit(lambda st, g, loss: opt.update(st, g, loss=loss))
        p_traj, snaps = [], []
        for i in range(STEPS):
            state = update(state, grads[i], jnp.float32(losses[i]))
            p_traj.append({k: np.asarray(v) for k, v in state.params.items()})
            if i in M_STEPS:
                snaps.append({"m": {k: np.asarray(v) for k, v in state.mom_rolling.m.items()},
                              "lstm_hidden": np.asarray(state.lstm_hidden_state.hidden),
                              "loss_means": np.asarray(state.loss_buffer["means"]),
                              "loss_min": np.asarray(state.loss_buffer["running_min"])})
        pre = f"case{c}/"
        arrays[pre + "config"] = np.array([scale, grad_scale, num_steps], np.float64)
        arrays[pre + "losses"] = losses
        if scale:  # the published theta itself is read from THETA_STATE by the tests too
            arrays.update(flat(theta, pre + "theta/"))
        for k in params:
            arrays[pre + f"p0/{k}"] = params[k]
            arrays[pre + f"grads/{k}"] = np.stack([g[k] for g in grads])
            arrays[pre + f"p/{k}"] = np.stack([p[k] for p in p_traj])
            arrays[pre + f"m/{k}"] = np.stack([s["m"][k] for s in snaps])
        for name in ("lstm_hidden", "loss_means", "loss_min"):
            arrays[pre + name] = np.stack([s[name] for s in snaps])
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({os.path.getsize(OUT) / 1e3:.0f} kB)")


if __name__ == "__main__":
    main(sys.argv[1])

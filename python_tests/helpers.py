"""Shared test utilities: the spec's agreement criterion and input builders."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

SHAPES = [(), (1,), (7,), (5, 3), (3, 5), (10, 10), (4, 3, 2), (2, 1, 6), (1, 1), (13, 17)]


def make_params(shapes, seed=0, scale=1.0):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
    return {f"t{i}_{'x'.join(map(str, s)) or 'scalar'}": scale * jax.random.normal(k, s, jnp.float32)
            for i, (s, k) in enumerate(zip(shapes, keys))}


def make_grads(params, seed):
    """Gradients with per-tensor magnitudes spread over 1e-3..1e1."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    mags = np.logspace(-3, 1, max(len(leaves), 2))
    out = [float(mags[i % len(mags)]) * jax.random.normal(k, jnp.shape(p), jnp.float32) + 0.1 * p
           for i, (p, k) in enumerate(zip(leaves, keys))]
    return jax.tree_util.tree_unflatten(treedef, out)


def max_violation(a, b, scale):
    """max(|a - b| / (1e-6 * scale + 1e-5 * |b|)): <= 1 means within the spec's bar."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0
    tol = 1e-6 * scale + 1e-5 * np.abs(b)
    tol = np.maximum(tol, np.finfo(np.float32).tiny)
    return float(np.max(np.abs(a - b) / tol))


def assert_trajectories_agree(test, ref, what=""):
    """test/ref: lists of pytrees over steps. Per tensor, the absolute term uses that
    tensor's largest magnitude over the whole run (the spec's criterion)."""
    t_steps = [jax.tree_util.tree_leaves_with_path(x) for x in test]
    r_steps = [jax.tree_util.tree_leaves_with_path(x) for x in ref]
    n_leaves = len(r_steps[0])
    for li in range(n_leaves):
        path = jax.tree_util.keystr(r_steps[0][li][0])
        scale = max(float(np.max(np.abs(np.asarray(s[li][1])))) if np.size(s[li][1]) else 0.0
                    for s in r_steps)
        for step, (ts, rs) in enumerate(zip(t_steps, r_steps)):
            v = max_violation(ts[li][1], rs[li][1], scale)
            assert v <= 1.0, f"{what}{path} step {step}: violation {v:.3g}x the tolerance"


def random_theta(cfg, seed):
    """init_theta plus non-zero decay offsets and biases, so every term matters."""
    theta = cfg.init_theta(jax.random.PRNGKey(seed))
    k = jax.random.split(jax.random.PRNGKey(seed + 100), 8)
    dm, dr, da = cfg.num_decays
    theta["momentum_decays"] = 0.05 * jax.random.normal(k[0], (dm,))
    theta["rms_decays"] = 0.05 * jax.random.normal(k[1], (dr,))
    theta["adafactor_decays"] = 0.05 * jax.random.normal(k[2], (da,))
    nn = theta["nn"]["~"]
    for i in range(cfg.hidden_layers + 1):
        nn[f"b{i}"] = 0.1 * jax.random.normal(k[3 + i % 4], nn[f"b{i}"].shape)
    return theta


def trajectory(cfg, theta, params, steps, impl, seed=0, fetch=lambda x: x):
    """`steps` jitted optax steps of `impl` with params-dependent gradients; returns the
    per-step (params, updates, state), each passed through `fetch`."""
    tx = cfg.transform(theta, impl=impl)

    @jax.jit
    def step(params, state, i):
        grads = make_grads(params, seed)  # traced: depends on params
        noise = jax.tree.map(lambda g: g * jnp.cos(i.astype(jnp.float32)), grads)
        updates, state = tx.update(noise, state, params)
        return optax.apply_updates(params, updates), state, updates

    state = tx.init(params)
    history = []
    for i in range(steps):
        params, state, updates = step(params, state, jnp.int32(i))
        history.append(fetch((params, updates, state)))
    return history


def memory_mappings() -> int:
    """This process's memory mappings (Linux's /proc), what vm.max_map_count limits."""
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def resident_bytes() -> int:
    """This process's resident set size (Linux's /proc)."""
    with open("/proc/self/status") as f:
        return 1024 * next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

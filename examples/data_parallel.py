"""Data-parallel (and optionally FSDP) training with the fused small_fc_lopt on a device mesh.

    python examples/data_parallel.py --devices 4 --steps 200          # data parallel
    python examples/data_parallel.py --devices 4 --steps 200 --fsdp   # params/state sharded too

On a CPU-only machine --devices N fakes N XLA devices (XLA_FLAGS=
--xla_force_host_platform_device_count=N, set before jax starts); on a GPU machine leave it
at 0 and every local GPU is used. The model is an MLP regression on synthetic data.

Data parallel: the batch is sharded over mesh axis "data", params and optimizer state are
replicated. One jitted step computes the loss gradient (jax's partitioner all-reduces it
across the batch shards) and applies lopt_ext's ordinary optax transform: each device runs
the fused kernel on its full replica, so the replicas stay identical with no extra
communication.

--fsdp: the weight matrices (and their m/rms state) are also sharded along their rows over
the same axis; lopt_ext.sharded.sharded_transform keeps the update exact (global
normalisation statistics by psum of partial sums; no tensor is gathered by the optimizer).
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=4, help="fake N CPU devices (0: use the real ones)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--fsdp", action="store_true")
    args = ap.parse_args()
    if args.devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    import lopt_ext
    from lopt_ext import sharded

    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("data",))
    lopt = lopt_ext.SmallFcLOpt(hidden_size=32)
    theta = lopt.init_theta(jax.random.PRNGKey(0))  # random meta-parameters: use trained ones in practice

    d_in, w = 32, args.width
    k = jax.random.split(jax.random.PRNGKey(1), 4)
    params = {"w1": jax.random.normal(k[0], (d_in, w)) / np.sqrt(d_in), "b1": jnp.zeros((w,)),
              "w2": jax.random.normal(k[1], (w, w)) / np.sqrt(w), "b2": jnp.zeros((w,)),
              "w3": jax.random.normal(k[2], (w, 1)) / np.sqrt(w)}
    teacher = jax.random.normal(k[3], (d_in, 1))

    def loss_fn(p, x, y):
        h = jax.nn.gelu(x @ p["w1"] + p["b1"])
        h = jax.nn.gelu(h @ p["w2"] + p["b2"])
        return jnp.mean((h @ p["w3"] - y) ** 2)

    if args.fsdp:  # shard each matrix along its first axis (must divide by n); vectors replicated
        specs = {name: (P("data", None) if x.ndim == 2 and x.shape[0] % n == 0 else P())
                 for name, x in params.items()}
        tx = sharded.sharded_transform(lopt, theta, mesh=mesh, param_specs=specs)
    else:
        specs = {name: P() for name in params}
        tx = lopt.transform(theta)
    p_shard = {name: NamedSharding(mesh, s) for name, s in specs.items()}
    params = jax.device_put(params, p_shard)
    opt_state = tx.init(params)
    if not args.fsdp:
        opt_state = jax.device_put(opt_state, NamedSharding(mesh, P()))
    batch_shard = NamedSharding(mesh, P("data"))

    @jax.jit
    def train_step(p, s, x, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)  # mean over the global batch
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    rng = np.random.default_rng(0)
    t0, losses = time.perf_counter(), []
    for step in range(args.steps):
        x = rng.standard_normal((args.batch, d_in)).astype(np.float32)
        y = np.tanh(x @ np.asarray(teacher))
        x, y = jax.device_put(x, batch_shard), jax.device_put(y, batch_shard)
        params, opt_state, loss = train_step(params, opt_state, x, y)
        losses.append(float(loss))
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.5f}")
    dt = time.perf_counter() - t0
    print(f"{n} devices, {'FSDP' if args.fsdp else 'data parallel'}: {args.steps} steps in {dt:.1f}s; "
          f"w2 sharding {params['w2'].sharding.spec}, m(w2) sharding {opt_state.m['w2'].sharding.spec}")


if __name__ == "__main__":
    main()

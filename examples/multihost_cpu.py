"""Multi-process (multi-host recipe) check on ONE machine: N processes x D CPU devices each,
jax.distributed + gloo collectives, FSDP-sharded small_fc_lopt over all N*D devices,
compared against the single-device reference computed in every process.

    python examples/multihost_cpu.py --processes 2 --local-devices 2

The parent spawns the workers (process_id 0..N-1) on localhost; each prints one line and
exits 0 when its shards of params and state agree with the reference.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def worker(pid, nproc, port, local_devices):
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=nproc, process_id=pid)
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    import lopt_ext
    from lopt_ext import sharded

    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("fsdp",))
    rng = np.random.default_rng(0)  # the same global values in every process
    shapes = {"w": (8 * n, 12), "v": (6, 4 * n), "b": (4 * n,), "s": ()}
    specs = {"w": P("fsdp", None), "v": P(None, "fsdp"), "b": P("fsdp"), "s": P()}
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: (0.1 * rng.standard_normal(s) + 0.01 * params[k]).astype(np.float32) for k, s in shapes.items()}
             for _ in range(3)]
    cfg = lopt_ext.SmallFcLOpt(hidden_size=8)
    theta = cfg.init_theta(jax.random.PRNGKey(0))

    def global_array(x, spec):  # each process supplies only its addressable shards
        sh = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(np.shape(x), sh, lambda idx: x[idx])

    p = {k: global_array(v, specs[k]) for k, v in params.items()}
    s = sharded.init_sharded_state(cfg, params, specs, mesh)
    step = jax.jit(lambda s, p, g: sharded.sharded_update(cfg, theta, s, p, g, mesh=mesh, param_specs=specs))
    ref_p, ref_s = params, lopt_ext.init_state(cfg, params)
    worst = 0.0
    for g in grads:
        p, s = step(s, p, {k: global_array(v, specs[k]) for k, v in g.items()})
        ref_p, ref_s = lopt_ext.fused_update(cfg, theta, ref_s, ref_p, g, impl="reference")
        for tree, ref in ((p, ref_p), (s.m, ref_s.m), (s.v_row, ref_s.v_row), (s.v_col, ref_s.v_col)):
            for k in tree:
                r = np.asarray(ref[k])
                scale = float(np.max(np.abs(r))) if r.size else 0.0
                for shard in tree[k].addressable_shards:
                    a, b = np.asarray(shard.data), r[shard.index]
                    if b.size:
                        worst = max(worst, float(np.max(np.abs(a - b) / (1e-6 * scale + 1e-5 * np.abs(b) + 1e-30))))
    ok = worst <= 1.0
    print(f"process {pid}/{nproc}: {n} global devices ({jax.local_device_count()} local), "
          f"worst violation {worst:.3g}x tolerance -> {'OK' if ok else 'FAIL'}", flush=True)
    jax.distributed.shutdown()
    sys.exit(0 if ok else 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--local-devices", type=int, default=2)
    ap.add_argument("--worker", type=int, default=None)
    ap.add_argument("--port", type=int, default=None)
    args = ap.parse_args()
    if args.worker is not None:
        worker(args.worker, args.processes, args.port, args.local_devices)
        return
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(i), "--port", str(port),
                               "--processes", str(args.processes), "--local-devices", str(args.local_devices)])
             for i in range(args.processes)]
    codes = [pr.wait(timeout=600) for pr in procs]
    print("exit codes", codes)
    sys.exit(0 if all(c == 0 for c in codes) else 1)


if __name__ == "__main__":
    main()

"""Populations of independent training runs spread over the host's cores.

Meta-training, its evaluation and the ES search step many tiny models at once: one vmapped
call over the members. On XLA:CPU such a call runs on one device, whose small ops XLA cannot
split well over cores: the thread pool's task queues and wake-ups cost more than they save
(measured here: a 16-member population of 2.4k-parameter MLPs uses ~1.35 of 2 cores).
Splitting the members between one CPU device per core instead lets each core run its share
end to end: ``population_vmap`` is ``jax.vmap`` whose member axis is sharded (``jax.shard_map``)
over every device of the default backend, padded to a multiple of the device count.

``use_cpu_cores()`` gives jax one CPU device per usable core; it must run before jax starts
its CPU backend (the command-line tools call it first; ``--cpu-devices N`` chooses). With one device (jax's default, a
single GPU, or a backend already started) ``population_vmap`` is exactly ``jax.vmap``.

Each member computes the same thing either way, but XLA may compile a smaller batch into
other kernels, so results differ at float32 round-off between device counts (and are
deterministic for a given count).
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "members"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def use_cpu_cores(count: Optional[int] = None) -> int:
    """Asks jax for ``count`` CPU devices (default: one per usable core); returns how many
    jax's CPU backend has. Once that backend has started, the count cannot change: then this
    warns (if it differs) and returns the existing count."""
    want = usable_cores() if count is None else int(count)
    if want < 1:
        raise ValueError(f"use_cpu_cores: count must be >= 1, got {count!r}")
    try:
        jax.config.update("jax_num_cpu_devices", want)
    except RuntimeError:
        have = len(jax.devices("cpu"))
        if have != want and count is not None:
            print(f"lopt_ext: jax's CPU backend already runs with {have} device(s); populations use "
                  f"{have}, not {want}", file=sys.stderr)
        return have
    return len(jax.devices("cpu"))


def population_devices() -> list:
    """The devices a population is spread over: every device of the default backend that this
    process drives (with jax.distributed, each process spreads its own populations)."""
    return list(jax.local_devices())


@functools.lru_cache(maxsize=None)
def _mesh(devices: tuple) -> Mesh:
    return Mesh(np.array(devices), (AXIS,))


def member_sharding(members: int):
    """Where an array of ``members`` leading entries lives between population calls: split over
    the devices when the count divides evenly, else replicated. None with one device. Passing
    it as a jit's out_shardings keeps a persistent population where the next call expects it
    (a jit compiles once per input sharding)."""
    devices = tuple(population_devices())
    if len(devices) == 1:
        return None
    spec = PartitionSpec(AXIS) if members % len(devices) == 0 else PartitionSpec()
    return NamedSharding(_mesh(devices), spec)


def replicated():
    """A sharding holding the whole array on every population device (None with one)."""
    devices = tuple(population_devices())
    return None if len(devices) == 1 else NamedSharding(_mesh(devices), PartitionSpec())


def place(tree, sharding):
    """``tree`` on ``sharding`` (unchanged when it is None)."""
    return tree if sharding is None else jax.device_put(tree, sharding)


def population_vmap(fn: Callable, in_axes: Sequence[Optional[int]]) -> Callable:
    """``jax.vmap(fn, in_axes)`` for positional arguments mapped on axis 0 (or None: shared by
    every member), every output mapped on axis 0, with the members spread over
    ``population_devices()``. Call it inside jax.jit."""
    in_axes = tuple(in_axes)
    if any(a not in (0, None) for a in in_axes):
        raise ValueError(f"population_vmap: in_axes must be 0 or None, got {in_axes}")
    batched = jax.vmap(fn, in_axes=in_axes)
    devices = population_devices()
    if len(devices) == 1:
        return batched
    mesh = _mesh(tuple(devices))
    n_dev = len(devices)

    def spread(*args):
        if len(args) != len(in_axes):
            raise TypeError(f"population_vmap: expected {len(in_axes)} arguments, got {len(args)}")
        sizes = {int(x.shape[0]) for a, arg in zip(in_axes, args) if a == 0
                 for x in jax.tree_util.tree_leaves(arg)}
        if len(sizes) != 1:
            raise ValueError(f"population_vmap: mapped arguments disagree on the member count: {sorted(sizes)}")
        (n,) = sizes
        pad = -n % n_dev

        def padded(x):  # repeat the last member: real work whose result is dropped
            return jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]) if pad else x

        args = [jax.tree_util.tree_map(padded, arg) if a == 0 else arg for a, arg in zip(in_axes, args)]
        specs = tuple(PartitionSpec(AXIS) if a == 0 else PartitionSpec() for a in in_axes)
        out = jax.shard_map(batched, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(AXIS),
                            check_vma=False)(*args)
        return jax.tree_util.tree_map(lambda x: x[:n], out) if pad else out

    return spread

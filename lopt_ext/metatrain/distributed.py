"""PES meta-training over several processes (jax.distributed): each process steps its share of
the task slots and every process applies the same outer update.

Slot i belongs to process i % process_count. Every process draws every slot's task and horizon
from the one PRNG key (metadata only for the slots of others), steps its own slots, and the
per-slot gradients and statistics are gathered and put back in slot order before the outer
update, so the update is computed exactly as in one process: with the same number of devices
per process, N processes give the result of one, bit for bit. On a cluster that jax.distributed
detects (SLURM, ...) `jax.distributed.initialize()` needs no arguments; on one machine
`meta-train --coordinator localhost:PORT --num-processes N --process-id I` starts process I.
"""
from __future__ import annotations

from typing import Any, List, Optional

import jax
import jax.numpy as jnp


def initialize(coordinator: Optional[str], num_processes: Optional[int], process_id: Optional[int]) -> None:
    """jax.distributed.initialize with CPU collectives (gloo); call it before jax starts a backend."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)


def owner(slot_index: int, process_count: int) -> int:
    return slot_index % process_count


def gather_in_slot_order(local: List[Any], num_slots: int) -> List[Any]:
    """Every process's per-slot values (pytrees of equal structure and shapes, this process's own
    slots in slot order) -> all slots' values in slot order, on every process."""
    count = jax.process_count()
    if count == 1:
        return list(local)
    from jax.experimental import multihost_utils
    per = -(-num_slots // count)
    padded = list(local) + [local[-1]] * (per - len(local))  # processes with a slot fewer send a copy
    stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *padded)
    every = multihost_utils.process_allgather(stacked)  # leading axes [process, own slot]
    return [jax.tree_util.tree_map(lambda x: jnp.asarray(x[owner(i, count), i // count]), every)
            for i in range(num_slots)]

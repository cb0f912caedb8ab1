"""How many compiled executables a process may keep: XLA:CPU maps each executable's code in
hundreds of small memory mappings, released only when the jitted function is dropped, and Linux
refuses mappings beyond vm.max_map_count (65530 by default), after which XLA dies in the middle
of a compilation ("LLVM compilation error: Cannot allocate memory", then a segfault). Caches of
compiled functions are bounded by what fits under that limit."""
from __future__ import annotations

from typing import Optional

MAP_COUNT_PATH = "/proc/sys/vm/max_map_count"
# measured on the training split's MLPs (2 CPU devices): a PES slot step and its slot init
# together add ~1000-1100 mappings
MAPPINGS_PER_TASK = 1100
RESERVE = 16384          # mappings left to everything else (libraries, arrays, evaluate's runs)
UNLIMITED_TASKS = 256    # the bound where no limit can be read (not Linux)


def max_map_count(path: str = MAP_COUNT_PATH) -> Optional[int]:
    """The kernel's per-process mapping limit, None where it cannot be read."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def tasks_that_fit(path: str = MAP_COUNT_PATH) -> int:
    """How many tasks' compiled meta-training steps fit under the mapping limit (at least 8)."""
    limit = max_map_count(path)
    if limit is None:
        return UNLIMITED_TASKS
    return max(8, (limit - RESERVE) // MAPPINGS_PER_TASK)

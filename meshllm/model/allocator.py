"""glibc's allocator, tuned for loading weights: large blocks mapped on their own, and freed
memory handed back to the system. Process-wide settings; a no-op off glibc."""

from __future__ import annotations

import ctypes

__all__ = ["LARGE_ALLOCATION_BYTES", "map_large_allocations", "release_free_memory"]

_M_MMAP_THRESHOLD = -3
LARGE_ALLOCATION_BYTES = 1 << 20

_mapped = False
"""Whether this process has set glibc's mmap threshold already (it holds for the process)."""


def map_large_allocations() -> None:
    """Have glibc serve every allocation of 1 MiB or more with its own mapping, given back at
    once when freed. By default glibc raises that threshold after the first large blocks are
    freed, so later loading temporaries land in its heap and stay there: a load's peak memory
    then varied from 0.6x to 1.9x the weights from one run to the next. The setting is the
    whole process's: it is made once, later calls do nothing."""
    global _mapped
    if _mapped:
        return
    _mapped = True
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, LARGE_ALLOCATION_BYTES)
    except (OSError, AttributeError):
        pass


def release_free_memory() -> None:
    """Hand memory freed while loading back to the system (glibc keeps it otherwise: about
    130 MB after loading the default model's int4 weights)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

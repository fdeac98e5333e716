"""Process-level settings that make CPU training faster here: glibc malloc and threads.

Every KD step allocates and frees vocabulary-sized buffers (tens of MB). glibc serves blocks
above its mmap threshold with fresh mmaps and unmaps them on free, so each step faults the same
memory back in; that measured at 17-25% of CPU time (DESIGN.md). Keeping freed memory in the
heap (`mmap_max=0`, a high `trim_threshold`) stops it. These settings are read when glibc
initialises, so they are set in the environment of a process before it starts
(`process_env`); `keep_freed_memory` applies the same through mallopt() at run time for
processes started without them.
"""

from __future__ import annotations

import ctypes
import os
import sys

MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1073741824"


def process_env(env: dict | None = None, threads: int = 0) -> dict:
    """A copy of `env` (default os.environ) with the malloc tunables, and thread counts if given."""
    env = dict(os.environ if env is None else env)
    old = env.get("GLIBC_TUNABLES")
    if not old or "malloc.mmap_max" not in old:
        env["GLIBC_TUNABLES"] = f"{old}:{MALLOC_TUNABLES}" if old else MALLOC_TUNABLES
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def keep_freed_memory() -> None:
    """mallopt() equivalent of MALLOC_TUNABLES, for a process already running."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: serve big blocks from the heap, not fresh mmaps
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: do not give the heap back eagerly
    except (OSError, AttributeError):
        pass

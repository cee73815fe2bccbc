"""How many CPUs this process may use."""

from __future__ import annotations

import os


def usable_cpu_count() -> int:
    """The CPUs this process may run on: its affinity mask (``taskset``, a Slurm allocation, a
    container's cpuset), which ``os.cpu_count()`` ignores (it counts the whole machine's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on macOS and Windows
        return os.cpu_count() or 1

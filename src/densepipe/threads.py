"""CPU threads for processes of ours that run side by side (DDP ranks, sweep trials)."""

from __future__ import annotations

import os


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def share_cores(env: dict[str, str] | os._Environ, processes: int) -> None:
    """Sets OMP_NUM_THREADS in env so that `processes` of ours split the cores, unless it is set
    (an empty value counts as unset, as OpenMP reads it).

    torch starts one OpenMP thread per core in every process. When the threads of several
    processes outnumber the cores, each parallel region waits for a thread that is not running:
    two trainings of 2 threads each on 2 cores ran about 25 times slower than two of 1 thread."""
    if not env.get("OMP_NUM_THREADS", "").strip():
        env["OMP_NUM_THREADS"] = str(max(1, available_cores() // processes))

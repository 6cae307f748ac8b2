"""How many threads each OpenMP team gets, so the serving process does not oversubscribe its cores.

torch's intra-op thread count is one number for the whole process, and every thread that runs a
torch CPU op (the device thread, each CPU-pool thread: decode, prepare, merge, encode) forks a
team of that size. The rule keeps (threads that may run such ops at once) x (team size) within the
cores this process may use:

* CUDA: the device thread only launches kernels (about one core, no team of its own worth
  counting); the pool's threads share the remaining cores: team = (cores - 1) // pool.
* CPU: the networks run in the device thread beside the pool: team = cores // (pool + 1). A CPU
  server that wants its networks on more cores runs a smaller pool (COLORIZE_WORKER_THREADS=1
  gives them half the cores; the pool's work is small beside the networks' there).

The pool itself is never larger than the cores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ThreadPlan:
    pool: int  # CPU-pool threads
    intra_op: int  # torch.set_num_threads: each OpenMP team's size


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform says, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def thread_plan(cores: int, worker_threads: int, device_type: str) -> ThreadPlan:
    """The pool size and team size for ``cores`` cores (see the module's rule)."""
    cores = max(1, cores)
    pool = max(1, min(worker_threads, cores))
    if device_type == "cuda":
        return ThreadPlan(pool, max(1, (cores - 1) // pool))
    return ThreadPlan(pool, max(1, cores // (pool + 1)))


def apply_thread_plan(plan: ThreadPlan) -> None:
    """Set torch's intra-op threads (process-wide) to the plan's team size."""
    import torch

    torch.set_num_threads(plan.intra_op)

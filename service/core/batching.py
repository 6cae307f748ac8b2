"""The one batch-collection rule, shared by the in-process batcher and the Redis worker.

A batch is handed to the engine once it holds ``max_batch_size`` jobs, or once its oldest job has
waited ``max_batch_delay_ms`` since its admission, whichever comes first. The delay is measured
from the oldest job's admission (not from when a worker first saw it): a job that already waited
in the queue is not held again. Both callers pass times on one clock: the memory queue its
monotonic clock, the Redis worker Redis server time (``enqueued_at`` is stamped with it).
"""

from __future__ import annotations


def fill_wait(oldest_admitted: float, delay_s: float, now: float) -> float:
    """Seconds a batch whose oldest job was admitted at ``oldest_admitted`` may still wait for
    more jobs at ``now``; 0 when the batch must go now."""
    return max(0.0, oldest_admitted + delay_s - now)

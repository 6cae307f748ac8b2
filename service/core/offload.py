"""Work on large bodies leaves the event loop (one rule for the router and the queues).

Hashing or base64-encoding a 20 MB body holds the loop for tens of milliseconds, during which no
other request, probe or heartbeat is served. Bodies over ``OFFLOAD_BYTES`` are processed on a
worker thread (hashlib and base64 release the GIL on large buffers); smaller ones inline, where
the thread hop would cost more than the work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ParamSpec, TypeVar

OFFLOAD_BYTES = 256 * 1024

P = ParamSpec("P")
R = TypeVar("R")


async def off_loop_if_large(
    size: int, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs
) -> R:
    """``function(*args, **kwargs)``: on a worker thread when ``size`` bytes are over the limit."""
    if size <= OFFLOAD_BYTES:
        return function(*args, **kwargs)
    return await asyncio.to_thread(function, *args, **kwargs)

"""CPU-bound request work (parsing and validating bodies) off the event loop, a few at a time.

Threads, not processes, decided by measurement (2 cores, bench/body_limits.py): a
0.9 s fhir.resources validation in a worker thread leaves the event loop a turn at
every GIL switch interval (loop ticks p50 6 ms, max 22 ms), because validation runs
Python code that gives the GIL up. A process pool would pickle each body both ways
and hold a validator per process, for no gain in responsiveness. What a thread cannot
do is interrupt one long C call that holds the GIL, such as orjson parsing a million
values: that is refused before it starts (``service.api.json_size``).

The limiter is the service's own: a flood of large bodies queues here (waiting costs
no thread) instead of taking every thread of the shared pool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread

T = TypeVar("T")


class Offload:
    def __init__(self, threads: int) -> None:
        self._limiter = anyio.CapacityLimiter(threads)

    async def run(self, work: Callable[[], T]) -> T:
        """``work()`` on a worker thread, once one of this limiter's threads is free."""
        return await anyio.to_thread.run_sync(work, limiter=self._limiter)

"""Group commit for the audit entries of requests that write nothing else (reads, refusals).

A read has no transaction of its own to put its entry in, and one transaction
per read (BEGIN, INSERT, INSERT, COMMIT) costs more than the read. The writer
collects the entries of concurrent requests and inserts them in one transaction;
each request waits until the transaction holding its entry has committed, so
the guarantee is the one `service.audit.recorder` gives: no entry, no response.
Nothing is acknowledged from memory, and a crash loses only entries whose
requests were never answered.

There is no timer: a flush starts as soon as an entry arrives and nothing is
being flushed, and whatever arrives meanwhile goes into the next one. At low
load every entry is flushed alone, at once; under load the batches grow by
themselves, with the commit rate bounded by the database's round trips.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from service.audit import request_audit
from service.audit.events import AuditRecord
from service.audit.recorder import PendingEntry, insert_entries
from service.store.database import Database

log = logging.getLogger(__name__)

# Rows per flush (a search page writes one entry per migrant: up to ~50 per request).
MAX_BATCH_ENTRIES = 500


@dataclass
class _Waiting:
    entries: list[PendingEntry]
    done: asyncio.Future[None]


@dataclass
class AuditWriter:
    database: Database
    max_batch_entries: int = MAX_BATCH_ENTRIES
    _queue: deque[_Waiting] = field(default_factory=deque)
    _flusher: asyncio.Task[None] | None = None

    async def write(self, records: Sequence[AuditRecord], *, request_id: str, source: str) -> None:
        """Return once these entries are committed; raise if they could not be."""
        if not records:
            return
        waiting = _Waiting(
            [PendingEntry(r, request_id, source) for r in records],
            asyncio.get_running_loop().create_future(),
        )
        # Marks a failure as seen even when its request is gone (no "never retrieved" warning).
        waiting.done.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._queue.append(waiting)
        flusher = self._flusher
        if flusher is None or flusher.done() or flusher.get_loop() is not asyncio.get_running_loop():
            self._flusher = asyncio.create_task(self._flush_all())
        # A request cancelled while waiting (client gone) leaves its entry to be written:
        # an entry for an answer never sent says more than was disclosed, never less.
        await asyncio.shield(waiting.done)
        request_audit.entry_committed()

    async def _flush_all(self) -> None:
        while self._queue:
            batch = self._take()
            try:
                await self._insert(batch)
            except Exception as exc:
                if len(batch) == 1:
                    _settle(batch[0], exc)
                    continue
                # One request's entries must not fail another's: retry each on its own.
                for waiting in batch:
                    try:
                        await self._insert([waiting])
                    except Exception as single:
                        _settle(waiting, single)
                    else:
                        _settle(waiting, None)
            else:
                for waiting in batch:
                    _settle(waiting, None)

    def _take(self) -> list[_Waiting]:
        batch: list[_Waiting] = []
        size = 0
        while self._queue and (not batch or size + len(self._queue[0].entries) <= self.max_batch_entries):
            waiting = self._queue.popleft()
            batch.append(waiting)
            size += len(waiting.entries)
        return batch

    async def _insert(self, batch: list[_Waiting]) -> None:
        async with self.database.transaction() as session:
            await insert_entries(session, [entry for waiting in batch for entry in waiting.entries])

    async def drain(self) -> None:
        """Wait for every entry handed over so far (at shutdown)."""
        flusher = self._flusher
        if flusher is not None and not flusher.done():
            await asyncio.shield(flusher)


def _settle(waiting: _Waiting, error: Exception | None) -> None:
    """Wake the request: its entries are committed (``error`` None) or they are not."""
    if waiting.done.done():
        return
    if error is None:
        waiting.done.set_result(None)
        return
    log.error("audit entries could not be written", extra={"error_type": type(error).__name__})
    waiting.done.set_exception(error)

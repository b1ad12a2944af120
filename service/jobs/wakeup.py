"""Wake this process's idle workers when a transaction that enqueued jobs commits.

A worker with nothing to do sleeps ``MHR_JOB_POLL_SECONDS`` between looks at the jobs table, so
a job enqueued by a request would wait up to that long (a notification's latency is mostly
this). :func:`enqueue` marks its session; when that session's transaction commits, every idle
worker of this process is woken at once, and the worker whose process committed the job usually
takes it first. On PostgreSQL the transaction also sends ``NOTIFY`` on :data:`CHANNEL`, which
the server delivers at commit to every process listening (service.jobs.listener): workers in
other processes (``mhr worker``, the other server workers) wake as soon. On SQLite they find it
on their next poll. A rolled-back transaction wakes nobody. The wake-up is a hint, never the
record: the jobs table is.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

_KEY = "mhr.jobs.enqueued"
# The PostgreSQL channel a transaction that enqueued a due job notifies (no payload: the jobs
# table is the record, and a notification carries nothing about the job).
CHANNEL = "mhr_jobs"
NOTIFY_ENQUEUED = text(f"SELECT pg_notify('{CHANNEL}', '')")
_waiting: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()


def mark_enqueued(session: AsyncSession) -> None:
    session.sync_session.info[_KEY] = True


def wake() -> None:
    for loop, ready in list(_waiting):
        with contextlib.suppress(RuntimeError):  # that loop is closed: its worker is gone
            loop.call_soon_threadsafe(ready.set)


@contextlib.contextmanager
def waiting() -> Iterator[asyncio.Event]:
    """An event set when a transaction of this process that enqueued jobs commits."""
    entry = (asyncio.get_running_loop(), asyncio.Event())
    _waiting.add(entry)
    try:
        yield entry[1]
    finally:
        _waiting.discard(entry)


@event.listens_for(Session, "after_commit")
def _committed(session: Session) -> None:
    if session.info.pop(_KEY, False):
        wake()


@event.listens_for(Session, "after_rollback")
def _rolled_back(session: Session) -> None:
    session.info.pop(_KEY, None)

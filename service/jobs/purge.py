"""``jobs.purge-done``: delete done jobs older than ``MHR_DONE_JOB_RETENTION_DAYS``, once a day.

A periodic job without a scheduler: each day's run is one job keyed by its UTC day, and it
enqueues the next day's in the transaction that completes it, so the chain is durable like
any job and every replica scheduling the same day makes one job. Each process that runs job
workers schedules today's at start (nothing, when today's exists already), which also
restarts a chain that ended dead.

Only ``done`` jobs go: ``dead`` ones wait for an operator, queued and running ones have work
left. A done job's idempotency key protects against a repeat only while the job is kept, so
the retention is also how long a cause may enqueue the same work again and be told it ran.
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession

from service.jobs.kinds import JobContext, JobKind, JobPayload, register
from service.jobs.queue import DONE, enqueue, utcnow
from service.store.tables import Job

log = logging.getLogger("mhr.jobs")


class PurgeDone(JobPayload):
    day: date  # the UTC day this run is for


def _start_of(day: date) -> datetime:
    return datetime.combine(day, time(0, 0), UTC)


async def schedule_purge(session: AsyncSession, day: date) -> int:
    """The purge of ``day`` (due from its start, UTC), in the caller's transaction; its job id."""
    return await enqueue(session, PURGE_DONE, PurgeDone(day=day), day.isoformat(), run_after=_start_of(day))


async def _run(job: JobContext[PurgeDone], session: AsyncSession) -> None:
    cutoff = utcnow() - timedelta(days=job.runtime.settings.done_job_retention_days)
    deleted: Any = await session.execute(delete(Job).where(Job.state == DONE, Job.updated_at < cutoff))
    log.info("done jobs purged", extra={"event": "jobs-purged", "deleted": int(deleted.rowcount)})
    await schedule_purge(session, job.payload.day + timedelta(days=1))


PURGE_DONE = register(JobKind(name="jobs.purge-done", payload_type=PurgeDone, run=_run, max_attempts=5))


def today() -> date:
    return utcnow().date()

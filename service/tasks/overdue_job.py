"""``tasks.overdue``: raise the follow-up tasks that passed their due date.

No timer loop: whenever a task gets a due date, a sweep for the day after it is enqueued in the
same transaction (idempotency key ``overdue:<day>``, so one job per day however many tasks fall
due on it). The sweep marks every open task past its due date (not only that day's: a sweep
late after an outage catches up) and calls ``task_event(..., "overdue")`` once per due date.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from service.jobs import JobContext, JobKind, enqueue
from service.jobs.kinds import JobPayload, register
from service.records.repository import RecordRepository
from service.tasks.notify import task_event
from service.tasks.repository import TaskRepository

SWEEP_BATCH = 500


class OverdueSweep(JobPayload):
    day: date  # the first day on which tasks due the day before are overdue


async def mark_overdue(repo: RecordRepository, today: date) -> int:
    """Raise every open task past its due date once (per due date); returns how many."""
    tasks = TaskRepository(repo.session)
    now = datetime.now(UTC)
    raised = 0
    while True:
        found = await tasks.newly_overdue(today, SWEEP_BATCH)
        for task in found:
            task.overdue_at = now
            await task_event(repo.session, task, "overdue")
        await repo.session.flush()
        raised += len(found)
        if len(found) < SWEEP_BATCH:
            return raised


async def _run(job: JobContext[OverdueSweep], session: AsyncSession) -> None:
    await mark_overdue(RecordRepository(session), max(job.payload.day, datetime.now(UTC).date()))


OVERDUE_SWEEP = register(JobKind(name="tasks.overdue", payload_type=OverdueSweep, run=_run, max_attempts=20))


async def schedule_sweep(session: AsyncSession, due: date) -> None:
    """Make sure a sweep runs once the day after ``due`` begins (UTC)."""
    day = due + timedelta(days=1)
    run_after = datetime.combine(day, time.min, tzinfo=UTC)
    await enqueue(session, OVERDUE_SWEEP, OverdueSweep(day=day), f"overdue:{day.isoformat()}", run_after)

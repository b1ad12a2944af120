"""``records.relabel``: relabel one migrant as a background job (``mhr records relabel --background``).

One job per migrant, so that a large relabel survives a crash and spreads over the workers: a
migrant's relabel commits with its job's completion, and a repeat finds it done. The payload is
the migrant's pseudonymous subject id, nothing else.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from service.jobs import JobContext, JobKind, enqueue
from service.jobs.kinds import JobPayload, register
from service.records.relabel import relabel_subject
from service.records.repository import RecordRepository
from service.store.database import Database
from service.store.tables import Subject


class RelabelMigrant(JobPayload):
    subject_id: str


async def _run(job: JobContext[RelabelMigrant], session: AsyncSession) -> None:
    await relabel_subject(RecordRepository(session), job.runtime.records, job.payload.subject_id)


RELABEL_MIGRANT = register(
    JobKind(name="records.relabel", payload_type=RelabelMigrant, run=_run, max_attempts=5)
)


async def enqueue_relabel(database: Database, run_id: str) -> int:
    """One job per migrant with a key, in one transaction; returns how many migrants.

    ``run_id`` names this relabel run: the same run enqueued twice is one job per migrant.
    """
    async with database.transaction() as session:
        subject_ids = (
            await session.execute(
                select(Subject.id).where(Subject.wrapped_key.is_not(None)).order_by(Subject.id)
            )
        ).scalars()
        count = 0
        for subject_id in list(subject_ids):
            await enqueue(
                session, RELABEL_MIGRANT, RelabelMigrant(subject_id=subject_id), f"{run_id}:{subject_id}"
            )
            count += 1
    return count

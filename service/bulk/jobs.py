"""The export's job kinds: ``bulk.export`` (one checkpointed step) and ``bulk.purge``.

A kick-off enqueues step 0 in its own transaction; each step enqueues the next in the transaction
that commits its checkpoint (idempotency key ``<export>:<step>``), so the chain survives a crash
and a restart: a step whose worker died is leased again and redone from the last checkpoint.
The last step enqueues the purge for the export's expiry; a cancel enqueues it at once. The purge
removes the files and destroys the export's wrapped file key (so a copy of a file left anywhere,
a backup included, can no longer be opened), in that order, idempotently.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from service.bulk.repository import ExportRepository
from service.bulk.step import CANCELLED, COMPLETE, EXPIRED, FAILED, export_files, run_step
from service.jobs import JobContext, JobKind, enqueue
from service.jobs.kinds import JobPayload, register


class ExportStep(JobPayload):
    export_id: str
    step: int


class PurgeExport(JobPayload):
    export_id: str


def step_key(export_id: str, step: int) -> str:
    return f"{export_id}:{step}"


async def _run_step(job: JobContext[ExportStep], session: AsyncSession) -> None:
    runtime = job.runtime
    export_id = job.payload.export_id
    result = await run_step(session, runtime, export_id)
    if result.more:
        pause = runtime.settings.export_step_pause_seconds
        await enqueue(
            session,
            EXPORT_STEP,
            ExportStep(export_id=export_id, step=job.payload.step + 1),
            step_key(export_id, job.payload.step + 1),
            run_after=datetime.now(UTC) + timedelta(seconds=pause) if pause else None,
        )
        return
    export = await ExportRepository(session).get(export_id)
    if export is not None and export.state == COMPLETE and export.expires_at is not None:
        await enqueue_purge(session, export_id, export.expires_at)


async def _purge(job: JobContext[PurgeExport], session: AsyncSession) -> None:
    exports = ExportRepository(session)
    export = await exports.locked(job.payload.export_id)
    if export is None or export.state not in (COMPLETE, FAILED, CANCELLED, EXPIRED):
        return
    if export.state == COMPLETE and export.expires_at is not None and export.expires_at > datetime.now(UTC):
        return  # not yet due (a purge job enqueued early by hand): the one at expiry remains
    export_files(job.runtime).remove(export.id)
    await exports.drop_files(export.id)
    export.wrapped_key = None
    if export.state == COMPLETE:
        export.state = EXPIRED


EXPORT_STEP = register(
    JobKind(
        name="bulk.export", payload_type=ExportStep, run=_run_step, max_attempts=8, backoff_base_seconds=2.0
    )
)
PURGE_EXPORT = register(JobKind(name="bulk.purge", payload_type=PurgeExport, run=_purge, max_attempts=20))


async def enqueue_first_step(session: AsyncSession, export_id: str) -> None:
    await enqueue(session, EXPORT_STEP, ExportStep(export_id=export_id, step=0), step_key(export_id, 0))


async def enqueue_purge(session: AsyncSession, export_id: str, when: datetime | None = None) -> None:
    suffix = "now" if when is None else "expiry"
    await enqueue(
        session, PURGE_EXPORT, PurgeExport(export_id=export_id), f"{export_id}:{suffix}", run_after=when
    )

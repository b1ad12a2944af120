"""``keys.reindex``: move the migrants after a cursor to the new index key as one job, then queue
the next batch (service.keys.index_rotation).

As ``keys.rewrap``: a batch commits with its job's completion, a crash repeats only that batch
(a migrant already moved is skipped), and its continuation is enqueued in the same transaction.
At the end of the ids a run looks again from the start, a few times, for migrants a process
still indexed under the old key after the rotation began (it had not yet re-read the state).
The payload carries a cursor (a pseudonymous subject id), a key id and numbers, nothing else.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import Field
from sqlalchemy.ext.asyncio import AsyncSession

from service.jobs import JobContext, JobError, JobKind, enqueue
from service.jobs.kinds import JobPayload, register
from service.keys.index_rotation import left_to_reindex, refresh_index_metric, reindex_batch, settled
from service.records.index_keys import UnknownIndexKey

DEFAULT_BATCH = 100
PASSES = 3


class ReindexBatch(JobPayload):
    run_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    target_kid: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    after: str = Field(default="", max_length=64)
    batch_size: int = Field(default=DEFAULT_BATCH, ge=1, le=10_000)
    pass_number: int = Field(default=1, ge=1, le=PASSES)


def idempotency_key(payload: ReindexBatch) -> str:
    return f"{payload.target_kid}:{payload.run_id}:{payload.pass_number}:{payload.after or '-'}"


async def _run(job: JobContext[ReindexBatch], session: AsyncSession) -> None:
    payload = job.payload
    index_keys = job.runtime.records.index_keys
    try:
        phase = await index_keys.refresh(session)
    except UnknownIndexKey as exc:
        raise JobError(f"{exc}; this worker reloads its keys and retries") from None
    if phase.current != payload.target_kid or not phase.rotating:
        return  # a rotation since finished or replaced: nothing of this run is left to do
    if not settled(phase, datetime.now(UTC)):
        raise JobError("the index key rotation has not settled yet: every process must take it up first")
    outcome = await reindex_batch(
        session, job.runtime.records, payload.target_kid, after=payload.after, limit=payload.batch_size
    )
    following = None
    if outcome.last_subject_id is not None:
        following = payload.model_copy(update={"after": outcome.last_subject_id})
    elif payload.pass_number < PASSES and await left_to_reindex(session, payload.target_kid):
        following = payload.model_copy(update={"after": "", "pass_number": payload.pass_number + 1})
    if following is not None:
        await enqueue(session, REINDEX_BATCH, following, idempotency_key(following))
    await refresh_index_metric(session)


REINDEX_BATCH = register(
    JobKind(
        name="keys.reindex", payload_type=ReindexBatch, run=_run, max_attempts=20, backoff_base_seconds=1.0
    )
)


async def start_reindex(session: AsyncSession, run_id: str, target_kid: str, batch_size: int) -> int:
    """Queue the first batch of a run (in the caller's transaction); returns its job id."""
    first = ReindexBatch(run_id=run_id, target_kid=target_kid, batch_size=batch_size)
    return await enqueue(session, REINDEX_BATCH, first, idempotency_key(first))

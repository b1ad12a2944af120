"""``keys.rewrap``: rewrap the subject keys after a cursor as one job, then queue the next batch.

One job per batch of migrants: a batch commits with its job's completion (service.jobs), a
crash repeats only that batch, and its continuation is enqueued in the same transaction, so a
run always either finishes or stops at a job an operator can see (``mhr jobs list``). The
idempotency key names the run, the target KEK version and the cursor: a batch is one job.
The payload carries a cursor (a pseudonymous subject id) and numbers, nothing else.
"""

from __future__ import annotations

from pydantic import Field
from sqlalchemy.ext.asyncio import AsyncSession

from security.keys import KekLifecycle
from service.jobs import JobContext, JobError, JobKind, enqueue
from service.jobs.kinds import JobPayload, register
from service.keys.rewrap import rewrap_batch, rewrap_subscription_headers
from service.keys.status import refresh_subject_key_metric

DEFAULT_BATCH = 200


class RewrapBatch(JobPayload):
    run_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    target_version: int = Field(ge=1)
    after: str = Field(default="", max_length=64)
    batch_size: int = Field(default=DEFAULT_BATCH, ge=1, le=10_000)


def idempotency_key(payload: RewrapBatch) -> str:
    return f"v{payload.target_version}:{payload.run_id}:{payload.after or '-'}"


async def _run(job: JobContext[RewrapBatch], session: AsyncSession) -> None:
    keys = job.runtime.keys
    payload = job.payload
    if keys.current_kek().version < payload.target_version and isinstance(keys, KekLifecycle):
        # `mhr keys rotate` ran in another process: take up the new version from the file or token.
        keys.reload()
    if keys.current_kek().version < payload.target_version:
        raise JobError(
            f"this worker's keys hold no KEK v{payload.target_version} yet; it reloads its keys and retries"
        )
    outcome = await rewrap_batch(
        session, keys, target=payload.target_version, after=payload.after, limit=payload.batch_size
    )
    if outcome.last_subject_id is not None:
        following = payload.model_copy(update={"after": outcome.last_subject_id})
        await enqueue(session, REWRAP_BATCH, following, idempotency_key(following))
    else:
        # The end of the migrants: the other data keys the KEK wraps, subscriptions' sealed
        # channel headers (few), so that retiring the old version strands none of them.
        await rewrap_subscription_headers(session, keys, target=payload.target_version)
    await refresh_subject_key_metric(session)


REWRAP_BATCH = register(
    JobKind(name="keys.rewrap", payload_type=RewrapBatch, run=_run, max_attempts=10, backoff_base_seconds=2.0)
)


async def start_rewrap(session: AsyncSession, run_id: str, target_version: int, batch_size: int) -> int:
    """Queue the first batch of a run (in the caller's transaction); returns its job id."""
    first = RewrapBatch(run_id=run_id, target_version=target_version, batch_size=batch_size)
    return await enqueue(session, REWRAP_BATCH, first, idempotency_key(first))

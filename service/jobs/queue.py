"""The jobs table: enqueue in the caller's transaction; lease, finish, fail, release; list, retry.

SQL only: the worker loop (service.jobs.worker) decides when each of these runs.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from service.jobs.kinds import JobKind, P
from service.jobs.wakeup import NOTIFY_ENQUEUED, mark_enqueued
from service.store.tables import Job

QUEUED, RUNNING, DONE, DEAD = "queued", "running", "done", "dead"
STATES = (QUEUED, RUNNING, DONE, DEAD)
MAX_KEY_CHARS = 200
MAX_ERROR_CHARS = 300


def utcnow() -> datetime:
    return datetime.now(UTC)


async def enqueue(
    session: AsyncSession,
    kind: JobKind[P],
    payload: P,
    idempotency_key: str,
    run_after: datetime | None = None,
) -> int:
    """Add a job in the caller's transaction (never committed here); returns its id.

    The same ``idempotency_key`` for the same kind is one job: a second enqueue returns the
    first job's id and changes nothing, whatever state that job is in.
    """
    if not isinstance(payload, kind.payload_type):
        raise TypeError(f"job kind {kind.name!r} takes a {kind.payload_type.__name__} payload")
    if not 0 < len(idempotency_key) <= MAX_KEY_CHARS:
        raise ValueError(f"an idempotency key has 1 to {MAX_KEY_CHARS} characters")
    now = utcnow()
    values: dict[str, Any] = {
        "kind": kind.name,
        "idempotency_key": idempotency_key,
        "payload": payload.model_dump(mode="json"),
        "state": QUEUED,
        "attempts": 0,
        "run_after": run_after or now,
        "created_at": now,
        "updated_at": now,
    }
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    statement = (
        dialect.insert(Job)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["kind", "idempotency_key"])
        .returning(Job.id)
    )
    inserted = (await session.execute(statement)).scalar_one_or_none()
    if inserted is not None:
        if values["run_after"] <= now:
            # Due now: wake this process's workers when it commits, and on PostgreSQL every
            # other process's too (service.jobs.listener; delivered at commit, never before).
            mark_enqueued(session)
            if dialect is postgresql:
                await session.execute(NOTIFY_ENQUEUED)
        return int(inserted)
    existing = await session.execute(
        select(Job.id).where(Job.kind == kind.name, Job.idempotency_key == idempotency_key)
    )
    return int(existing.scalar_one())


@dataclass(frozen=True)
class Lease:
    job_id: int
    kind: str
    idempotency_key: str
    payload: dict[str, Any]
    attempt: int
    token: str


def _due(kinds: Sequence[str], now: datetime) -> Any:
    """Queued jobs whose time has come, and running ones whose lease expired (their worker died)."""
    return and_(
        Job.kind.in_(kinds),
        or_(
            and_(Job.state == QUEUED, Job.run_after <= now),
            and_(Job.state == RUNNING, Job.leased_until < now),
        ),
    )


async def anything_due(session: AsyncSession, kinds: Sequence[str]) -> bool:
    """A cheap look without a lock, so that an idle worker takes no write lock (SQLite)."""
    found = await session.execute(select(Job.id).where(_due(kinds, utcnow())).limit(1))
    return found.first() is not None


@dataclass(frozen=True)
class Expired:
    """A job whose last allowed attempt was cut off (its worker died holding it)."""

    job_id: int
    kind: str
    attempts: int


async def lease_one(
    session: AsyncSession,
    kinds: Sequence[str],
    *,
    owner: str,
    lease_seconds: float,
    max_attempts: dict[str, int],
) -> Lease | Expired | None:
    """Lease the next due job (the caller's transaction commits the lease).

    PostgreSQL skips rows another worker has locked; on SQLite this transaction holds the
    database's only write lock. A job taken over after its lease expired whose attempts are used
    up is not run again: it is returned as :class:`Expired` for the caller to mark dead.
    """
    now = utcnow()
    job = (
        await session.execute(
            select(Job)
            .where(_due(kinds, now))
            .order_by(Job.run_after, Job.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
    ).scalar_one_or_none()
    if job is None:
        return None
    if job.state == RUNNING and job.attempts >= max_attempts[job.kind]:
        await _finish(session, job.id, DEAD, "LeaseExpired", "the worker holding its last attempt stopped")
        return Expired(job.id, job.kind, job.attempts)
    token = secrets.token_hex(16)
    job.state = RUNNING
    job.attempts += 1
    job.leased_until = now + timedelta(seconds=lease_seconds)
    job.lease_owner = owner[:128]
    job.lease_token = token
    job.updated_at = now
    await session.flush()
    return Lease(job.id, job.kind, job.idempotency_key, dict(job.payload), job.attempts, token)


async def claim_completion(session: AsyncSession, lease: Lease) -> bool:
    """Mark the job done in the handler's transaction, first: row-locked and only while this
    lease holds, so that the handler's effect commits with the completion or not at all."""
    result = await session.execute(
        update(Job)
        .where(Job.id == lease.job_id, Job.lease_token == lease.token, Job.state == RUNNING)
        .values(
            state=DONE,
            leased_until=None,
            lease_token=None,
            error_type=None,
            error_message=None,
            updated_at=utcnow(),
        )
    )
    return _rowcount(result) == 1


async def renew_lease(session: AsyncSession, lease: Lease, seconds: float) -> bool:
    """Extend a lease still held (row-locked, in the caller's transaction) to ``seconds`` from now:
    a job run in steps says so before each step, so that its lease outlives the slow part."""
    now = utcnow()
    result = await session.execute(
        update(Job)
        .where(Job.id == lease.job_id, Job.lease_token == lease.token, Job.state == RUNNING)
        .values(leased_until=now + timedelta(seconds=seconds), updated_at=now)
    )
    return _rowcount(result) == 1


async def record_failure(
    session: AsyncSession, lease: Lease, *, error_type: str, message: str, retry_in: float | None
) -> str | None:
    """After a failed attempt: queued again after ``retry_in`` seconds, or dead (``None``).
    Returns the new state, or None when the lease was lost meanwhile (someone else owns it)."""
    now = utcnow()
    state = DEAD if retry_in is None else QUEUED
    values: dict[str, Any] = {
        "state": state,
        "leased_until": None,
        "lease_token": None,
        "error_type": error_type[:100],
        "error_message": message[:MAX_ERROR_CHARS],
        "updated_at": now,
    }
    if retry_in is not None:
        values["run_after"] = now + timedelta(seconds=retry_in)
    result = await session.execute(
        update(Job).where(Job.id == lease.job_id, Job.lease_token == lease.token).values(**values)
    )
    return state if _rowcount(result) == 1 else None


async def release(session: AsyncSession, lease: Lease) -> bool:
    """Give a job back unfinished (the worker is stopping): due at once, the attempt not counted."""
    now = utcnow()
    result = await session.execute(
        update(Job)
        .where(Job.id == lease.job_id, Job.lease_token == lease.token, Job.state == RUNNING)
        .values(
            state=QUEUED,
            attempts=Job.attempts - 1,
            run_after=now,
            leased_until=None,
            lease_token=None,
            lease_owner=None,
            updated_at=now,
        )
    )
    return _rowcount(result) == 1


async def _finish(session: AsyncSession, job_id: int, state: str, error_type: str, message: str) -> None:
    await session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(
            state=state,
            leased_until=None,
            lease_token=None,
            error_type=error_type,
            error_message=message[:MAX_ERROR_CHARS],
            updated_at=utcnow(),
        )
    )


async def mark_dead(session: AsyncSession, lease: Lease, error_type: str, message: str) -> None:
    await record_failure(session, lease, error_type=error_type, message=message, retry_in=None)


def _rowcount(result: Any) -> int:
    return int(result.rowcount)


@dataclass(frozen=True)
class JobView:
    """A job as an operator sees it."""

    id: int
    kind: str
    state: str
    attempts: int
    idempotency_key: str
    payload: dict[str, Any]
    run_after: datetime
    leased_until: datetime | None
    lease_owner: str | None
    error_type: str | None
    error_message: str | None
    created_at: datetime
    updated_at: datetime

    def as_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def _view(job: Job) -> JobView:
    return JobView(
        job.id,
        job.kind,
        job.state,
        job.attempts,
        job.idempotency_key,
        dict(job.payload),
        job.run_after,
        job.leased_until,
        job.lease_owner,
        job.error_type,
        job.error_message,
        job.created_at,
        job.updated_at,
    )


async def list_jobs(
    session: AsyncSession, *, state: str | None = None, kind: str | None = None, limit: int = 100
) -> list[JobView]:
    query = select(Job).order_by(Job.id.desc()).limit(limit)
    if state is not None:
        query = query.where(Job.state == state)
    if kind is not None:
        query = query.where(Job.kind == kind)
    return [_view(job) for job in (await session.execute(query)).scalars()]


async def get_job(session: AsyncSession, job_id: int) -> JobView | None:
    job = await session.get(Job, job_id)
    return None if job is None else _view(job)


class NotRetryable(Exception):
    """Only a dead job is retried by hand; the message says what state it is in."""


async def retry_dead(session: AsyncSession, job_id: int) -> JobView:
    """Queue a dead job again, due now, with its attempts reset (its last error stays visible
    until it runs)."""
    job = (await session.execute(select(Job).where(Job.id == job_id).with_for_update())).scalar_one_or_none()
    if job is None:
        raise NotRetryable(f"no job {job_id}")
    if job.state != DEAD:
        raise NotRetryable(f"job {job_id} is {job.state}: only a dead job is retried")
    now = utcnow()
    job.state, job.attempts, job.run_after, job.updated_at = QUEUED, 0, now, now
    job.lease_owner = None
    await session.flush()
    return _view(job)


async def counts(session: AsyncSession) -> dict[tuple[str, str], int]:
    """Jobs by (kind, state), for the metrics."""
    rows = await session.execute(select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state))
    return {(kind, state): int(n) for kind, state, n in rows}

"""The KEK use-cases behind ``mhr keys rotate|rewrap|status|retire``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from security.keys import KEK_PURPOSE, KekLifecycle, KekRef, KeyProvider, KeyringError
from service.jobs import queue
from service.jobs.kinds import REGISTRY, load_kinds
from service.keys.progress import Progress
from service.keys.rewrap import subscription_headers_per_version
from service.keys.rewrap_job import REWRAP_BATCH, start_rewrap
from service.keys.status import KekStatus, kek_status
from service.store.database import Database
from service.store.tables import Job, KeyCheck, Subject

if TYPE_CHECKING:
    from service.runtime.providers import Runtime

# Writes an admin action's audit entry in the action's transaction: (session, subtype, entity).
Audit = Callable[[AsyncSession, str, tuple[str, str]], Awaitable[None]]
POLL_SECONDS = 0.5


class KeyLifecycleError(Exception):
    """An operator's key command cannot be done; the message says why (no key material)."""


def lifecycle_of(keys: KeyProvider) -> KekLifecycle:
    if not isinstance(keys, KekLifecycle):
        raise KeyLifecycleError(f"{type(keys).__name__} cannot rotate or retire its KEK")
    return keys


async def rotate(database: Database, keys: KeyProvider, audit: Audit) -> KekRef:
    """A new current KEK version; the keyring or token holds it before anything is recorded."""
    try:
        ref = lifecycle_of(keys).rotate_kek()
    except KeyringError as exc:
        raise KeyLifecycleError(str(exc)) from None
    async with database.transaction() as session:
        await audit(session, "kek-rotate", ("Key", f"{KEK_PURPOSE}/v{ref.version}"))
    return ref


async def status(database: Database, keys: KeyProvider) -> KekStatus:
    async with database.reading() as session:
        return await kek_status(session, keys)


@dataclass(frozen=True)
class RewrapRun:
    run_id: str
    target_version: int
    to_rewrap: int


async def start(database: Database, keys: KeyProvider, run_id: str, batch_size: int) -> RewrapRun:
    target = keys.current_kek().version
    async with database.transaction() as session:
        before = await kek_status(session, keys)
        await start_rewrap(session, run_id, target, batch_size)
    return RewrapRun(run_id, target, before.stale)


async def _run_state(session: AsyncSession, run: RewrapRun) -> dict[str, int]:
    prefix = f"v{run.target_version}:{run.run_id}:"
    rows = await session.execute(
        select(Job.state, func.count())
        .where(Job.kind == REWRAP_BATCH.name, Job.idempotency_key.startswith(prefix, autoescape=True))
        .group_by(Job.state)
    )
    return {state: int(n) for state, n in rows.all()}


async def _left(session: AsyncSession, target: int) -> int:
    found = await session.execute(
        select(func.count()).where(
            Subject.wrapped_key.is_not(None), (Subject.kek_version < target) | Subject.kek_version.is_(None)
        )
    )
    return int(found.scalar_one())


async def wait(runtime: Runtime, run: RewrapRun, progress: Progress) -> dict[str, int]:
    """Work the run's batches here (beside any other worker) and show progress until it ends.

    Returns the run's jobs by state; a dead one means the run stopped (``mhr jobs list``).
    """
    from service.jobs.worker import Worker, worker_name

    load_kinds(runtime.settings.job_modules)
    worker = Worker(runtime, REGISTRY, name=worker_name(0) + ":rewrap")
    database = runtime.database
    while True:
        worked = await worker.run_one([REWRAP_BATCH.name])
        async with database.reading() as session:
            states = await _run_state(session, run)
            left = await _left(session, run.target_version)
        finished = not states.get(queue.QUEUED) and not states.get(queue.RUNNING)
        progress.update(max(0, run.to_rewrap - left), final=finished)
        if finished:
            return states
        if not worked:
            await asyncio.sleep(POLL_SECONDS)


async def retire(
    database: Database, keys: KeyProvider, below: int, audit: Audit, *, force: bool = False
) -> tuple[tuple[int, ...], int]:
    """Destroy the KEK versions below ``below``; returns them and how many live keys they strand.

    Refused while live subject keys are still wrapped under them, unless ``force``: those
    migrants' data would be unreadable (it is then reported by ``mhr keys status``).
    """
    lifecycle = lifecycle_of(keys)
    current = keys.current_kek()
    if not 0 < below <= current.version:
        raise KeyLifecycleError(f"cannot retire below v{below}: the current KEK is v{current.version}")
    async with database.reading() as session:
        stranded = await _left(session, below)
        headers = sum(n for v, n in (await subscription_headers_per_version(session)).items() if v < below)
    if stranded and not force:
        raise KeyLifecycleError(
            f"{stranded} live subject keys are still wrapped under KEK versions below v{below}: run "
            "`mhr keys rewrap --wait` first (or --force to make their data unreadable)"
        )
    if headers and not force:
        raise KeyLifecycleError(
            f"{headers} subscriptions' sealed channel headers are still wrapped under KEK versions below "
            f"v{below}: run `mhr keys rewrap --wait` first (or --force: their notifications then fail)"
        )
    try:
        destroyed = lifecycle.retire_kek_below(below)
    except KeyringError as exc:
        raise KeyLifecycleError(str(exc)) from None
    async with database.transaction() as session:
        # The start-up check (service.keys.keyring_match) must not ask for a key destroyed on purpose.
        recorded = (
            await session.execute(select(KeyCheck.key_id).where(KeyCheck.purpose == KEK_PURPOSE))
        ).scalars()
        retired_ids = [kid for kid in recorded if _retired(kid, current.key_id, below)]
        if retired_ids:
            await session.execute(
                delete(KeyCheck).where(KeyCheck.purpose == KEK_PURPOSE, KeyCheck.key_id.in_(retired_ids))
            )
        await audit(session, "kek-retire", ("Key", f"{KEK_PURPOSE}/below-v{below}"))
    return destroyed, stranded


def _retired(recorded_id: str, kek_id: str, below: int) -> bool:
    # Recorded KEK ids are "<kek id>/v<version>" (security.keys key_checks).
    prefix = f"{kek_id}/v"
    suffix = recorded_id.removeprefix(prefix)
    return recorded_id.startswith(prefix) and suffix.isdigit() and int(suffix) < below

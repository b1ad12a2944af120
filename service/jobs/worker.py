"""One job worker: lease a due job, run it in the transaction that completes it, record a failure.

A worker stops leasing as soon as the process drains (service.core.lifecycle) or it is told to stop;
the job it holds then finishes, or, past the grace period, is cancelled (its transaction rolls
back) and released, due again at once for another worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from pydantic import ValidationError

from service.core.lifecycle import SHUTDOWN
from service.core.metrics import JOB_RUNS
from service.jobs import queue, wakeup
from service.jobs.kinds import JobContext, JobError, JobRegistry, PermanentJobError, UnknownJobKind

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from service.runtime.providers import Runtime

log = logging.getLogger("mhr.jobs")


class LeaseLost(Exception):
    """The lease expired and another worker took the job over: this attempt's effect is dropped."""


class Steps:
    """JobSteps for one lease: each step renews it first, in the step's own transaction."""

    def __init__(self, runtime: Runtime, lease: queue.Lease) -> None:
        self.runtime = runtime
        self.lease = lease

    @contextlib.asynccontextmanager
    async def step(self, hold_seconds: float) -> AsyncIterator[AsyncSession]:
        async with self.runtime.database.transaction() as session:
            if not await queue.renew_lease(session, self.lease, hold_seconds):
                raise LeaseLost
            yield session


def worker_name(index: int) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{index}"


class Worker:
    def __init__(self, runtime: Runtime, registry: JobRegistry, *, name: str) -> None:
        self.runtime = runtime
        self.registry = registry
        self.name = name
        self.settings = runtime.settings
        self.stopping = asyncio.Event()
        self.current: queue.Lease | None = None

    @property
    def _should_lease(self) -> bool:
        return not (self.stopping.is_set() or SHUTDOWN.draining)

    async def run(self) -> None:
        """Work until told to stop; a database error is logged and retried after a pause."""
        kinds = self.registry.names()
        with wakeup.waiting() as woken:
            while self._should_lease:
                woken.clear()  # before the look: a commit during it wakes the next idle at once
                try:
                    worked = await self.run_one(kinds)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.error("job worker error; retrying", extra={"error_type": type(exc).__name__})
                    worked = False
                if not worked:
                    await self._idle(woken)

    async def _idle(self, woken: asyncio.Event) -> None:
        """Until the poll interval passes, this process commits a due job, or we are stopped."""
        waits = [asyncio.ensure_future(self.stopping.wait()), asyncio.ensure_future(woken.wait())]
        try:
            await asyncio.wait(
                waits, timeout=self.settings.job_poll_seconds, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiting in waits:
                waiting.cancel()

    async def run_one(self, kinds: list[str] | None = None) -> bool:
        """Lease and run one due job; False when there was none."""
        kinds = kinds if kinds is not None else self.registry.names()
        database = self.runtime.database
        async with database.reading() as session:
            if not await queue.anything_due(session, kinds):
                return False
        max_attempts = {name: self.registry.get(name).max_attempts for name in kinds}
        async with database.transaction() as session:
            leased = await queue.lease_one(
                session,
                kinds,
                owner=self.name,
                lease_seconds=self.settings.job_lease_seconds,
                max_attempts=max_attempts,
            )
        if leased is None:
            return False
        if isinstance(leased, queue.Expired):
            JOB_RUNS.labels(leased.kind, "dead").inc()
            log.error(
                "job dead: its last attempt was cut off",
                extra={"job_id": leased.job_id, "job_kind": leased.kind},
            )
            return True
        self.current = leased
        try:
            await self._execute(leased)
        finally:
            self.current = None
        return True

    async def _execute(self, lease: queue.Lease) -> None:
        kind = self.registry.get(lease.kind)
        try:
            payload = kind.payload_type.model_validate(lease.payload)
        except ValidationError as exc:
            await self._failed(lease, PermanentJobError(f"payload invalid ({exc.error_count()} errors)"))
            return
        context = JobContext(
            job_id=lease.job_id,
            kind=lease.kind,
            idempotency_key=lease.idempotency_key,
            attempt=lease.attempt,
            payload=payload,
            runtime=self.runtime,
        )
        try:
            if kind.run_in_steps is not None:
                await kind.run_in_steps(context, Steps(self.runtime, lease))
            async with self.runtime.database.transaction() as session:
                if not await queue.claim_completion(session, lease):
                    raise LeaseLost
                if kind.run is not None:
                    await kind.run(context, session)
        except asyncio.CancelledError:
            # Stopping past the grace period: the transaction rolled back; give the job back.
            await asyncio.shield(self._release(lease))
            raise
        except LeaseLost:
            JOB_RUNS.labels(lease.kind, "lease_lost").inc()
            log.warning("job lease lost: another worker took it over", extra={"job_id": lease.job_id})
            return
        except Exception as exc:
            await self._failed(lease, exc)
            return
        JOB_RUNS.labels(lease.kind, "done").inc()
        log.info("job done", extra={"job_id": lease.job_id, "job_kind": lease.kind, "attempt": lease.attempt})

    async def _failed(self, lease: queue.Lease, exc: Exception) -> None:
        kind = self.registry.get(lease.kind)
        # Only our own errors' messages are kept: any other exception's text may quote data.
        message = str(exc) if isinstance(exc, JobError) else "the handler raised an unexpected error"
        permanent = isinstance(exc, PermanentJobError) or lease.attempt >= kind.max_attempts
        retry_in = None if permanent else kind.backoff(lease.attempt)
        async with self.runtime.database.transaction() as session:
            state = await queue.record_failure(
                session, lease, error_type=type(exc).__name__, message=message, retry_in=retry_in
            )
        outcome = "dead" if state == queue.DEAD else "retry"
        JOB_RUNS.labels(lease.kind, outcome).inc()
        log.log(
            logging.ERROR if state == queue.DEAD else logging.WARNING,
            "job dead" if state == queue.DEAD else "job failed; will retry",
            extra={
                "job_id": lease.job_id,
                "job_kind": lease.kind,
                "attempt": lease.attempt,
                "error_type": type(exc).__name__,
                "retry_in_seconds": None if retry_in is None else round(retry_in, 1),
            },
        )

    async def _release(self, lease: queue.Lease) -> None:
        try:
            async with self.runtime.database.transaction() as session:
                released = await queue.release(session, lease)
        except Exception as exc:  # its lease expires and another worker takes it over
            log.error(
                "could not release a job", extra={"job_id": lease.job_id, "error_type": type(exc).__name__}
            )
            return
        if released:
            log.info("job released unfinished", extra={"job_id": lease.job_id, "job_kind": lease.kind})


__all__ = ["LeaseLost", "Steps", "UnknownJobKind", "Worker", "worker_name"]

"""The background work of one process: the audit integrator, job workers, the job-count metric,
the upkeep of the kept search totals.

Started by the app's lifespan in every ``mhr serve`` process and by ``mhr worker`` on its own.
Every replica may run all of it: the integrator's lock and the job leases let one of them act at
a time. A server process beside a background process (``mhr serve --workers N``, or
``MHR_BACKGROUND_IN_SERVER=false`` beside ``mhr worker``) runs only its own part (``shared``
False): following the index keys, counting jobs for its ``/metrics``.

Stopping (from the start of the drain, in a server): workers stop leasing, the job each holds
gets ``grace_seconds`` to finish and is otherwise cancelled and released; then the integrator
stops between two seals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from service.audit.log import start_integrator, stop_integrator
from service.core.lifecycle import SHUTDOWN
from service.core.metrics import JOBS
from service.jobs import queue
from service.jobs.kinds import load_kinds
from service.jobs.listener import listen_forever
from service.jobs.purge import schedule_purge, today
from service.jobs.worker import Worker, worker_name
from service.keys.status import refresh_subject_key_metric
from service.records import kept_totals
from service.records.index_keys import REFRESH_SECONDS

if TYPE_CHECKING:
    from service.runtime.providers import Runtime

log = logging.getLogger("mhr.jobs")

METRICS_INTERVAL_SECONDS = 15.0
DRAIN_WATCH_SECONDS = 0.2


class BackgroundWork:
    def __init__(self, runtime: Runtime, *, job_workers: int, shared: bool = True) -> None:
        self.runtime = runtime
        self.shared = shared
        self.registry = load_kinds(runtime.settings.job_modules)
        self.workers = [
            Worker(runtime, self.registry, name=worker_name(i)) for i in range(job_workers if shared else 0)
        ]
        self._worker_tasks: list[asyncio.Task[None]] = []
        self._integrator: asyncio.Task[None] | None = None
        self._metrics: asyncio.Task[None] | None = None
        self._seen: set[tuple[str, str]] = set()
        self._stopping_since: float | None = None
        self._drain_watch: asyncio.Task[None] | None = None
        self._schedule: asyncio.Task[None] | None = None
        self._index_follow: asyncio.Task[None] | None = None
        self._kept_totals: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._metrics = asyncio.create_task(self._count_forever(), name="mhr-job-metrics")
        self._index_follow = asyncio.create_task(self._follow_index_keys(), name="mhr-index-keys")
        if not self.shared:
            return
        self._integrator = start_integrator(self.runtime.database, self.runtime.log_signer)
        self._worker_tasks = [
            asyncio.create_task(worker.run(), name=f"mhr-job-worker-{i}")
            for i, worker in enumerate(self.workers)
        ]
        self._kept_totals = asyncio.create_task(self._keep_totals(), name="mhr-kept-totals")
        self._drain_watch = asyncio.create_task(self._watch_drain(), name="mhr-job-drain-watch")
        if self.workers:
            # Who runs jobs schedules the periodic ones (one job per day whoever schedules it).
            self._schedule = asyncio.create_task(self._schedule_periodic(), name="mhr-job-schedule")
            if not self.runtime.database.is_sqlite:
                # Jobs enqueued by other processes wake these workers at once (else: next poll).
                self._listener = asyncio.create_task(
                    listen_forever(self.runtime.settings.database_url), name="mhr-job-listener"
                )
            log.info(
                "job workers started", extra={"workers": len(self.workers), "kinds": self.registry.names()}
            )

    def begin_stopping(self) -> None:
        """Stop leasing now; the grace period of the jobs in hand starts here."""
        if self._stopping_since is None:
            self._stopping_since = time.monotonic()
        for worker in self.workers:
            worker.stopping.set()

    async def stop(self, grace_seconds: float) -> None:
        """Stop: the jobs in hand get ``grace_seconds`` from when stopping began (the drain's
        start, in a server), so that the whole stop fits in the time the orchestrator allows."""
        self.begin_stopping()
        assert self._stopping_since is not None
        remaining = max(0.0, self._stopping_since + grace_seconds - time.monotonic())
        if self._worker_tasks:
            _done, late = await asyncio.wait(self._worker_tasks, timeout=remaining)
            for task in late:
                task.cancel()  # the job is released (Worker._execute)
            await asyncio.gather(*self._worker_tasks, return_exceptions=True)
        if self._schedule is not None:
            self._schedule.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._schedule
        if self._drain_watch is not None:
            self._drain_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain_watch
        for looping in (self._metrics, self._index_follow, self._kept_totals, self._listener):
            if looping is not None:
                looping.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await looping
        if self._integrator is not None:
            await stop_integrator(self._integrator)

    async def _schedule_periodic(self) -> None:
        try:
            async with self.runtime.database.transaction() as session:
                await schedule_purge(session, today())
        except Exception as exc:
            # The next start schedules it; meanwhile done jobs are only kept longer.
            log.warning("could not schedule the purge of done jobs", extra={"error_type": type(exc).__name__})

    async def _watch_drain(self) -> None:
        """The process's drain (SIGTERM in a server) is a signal handler's flag: look for it."""
        while not SHUTDOWN.draining:  # noqa: ASYNC110 - set by a signal handler, not an event
            await asyncio.sleep(DRAIN_WATCH_SECONDS)
        self.begin_stopping()

    async def refresh_metrics(self) -> None:
        async with self.runtime.database.reading() as session:
            found = await queue.counts(session)
            await refresh_subject_key_metric(session)
        for labels in self._seen - found.keys():
            JOBS.labels(*labels).set(0)
        for labels, count in found.items():
            JOBS.labels(*labels).set(count)
        self._seen |= found.keys()

    async def _follow_index_keys(self) -> None:
        """Re-read which blind-index keys are in use (service.records.index_keys): a rotation
        started by `mhr keys rotate-index` in another process is taken up within a second."""
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                async with self.runtime.database.reading() as session:
                    await self.runtime.records.index_keys.refresh(session)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("could not read the index key state", extra={"error_type": type(exc).__name__})

    async def _keep_totals(self) -> None:
        """Retire ended grants and fold the kept totals' additions (service.records.kept_totals):
        without it totals stay exact, and cost what happened since the last run."""
        while True:
            await asyncio.sleep(kept_totals.MAINTENANCE_SECONDS)
            try:
                await kept_totals.maintain(self.runtime.database, datetime.now(UTC))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("could not keep the search totals", extra={"error_type": type(exc).__name__})

    async def _count_forever(self) -> None:
        while True:
            try:
                await self.refresh_metrics()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("could not count jobs", extra={"error_type": type(exc).__name__})
            await asyncio.sleep(METRICS_INTERVAL_SECONDS)

"""Done jobs are purged after MHR_DONE_JOB_RETENTION_DAYS by a daily job, on SQLite and PostgreSQL.

What an operator relies on: the jobs table does not grow for ever; only done jobs older than the
retention go (dead ones wait for the operator, queued ones still have work); the purge repeats
every day by itself, and every process that starts schedules it without making a second one.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from jobs_testkinds import EFFECT, Effect

from security.keys import LocalKeyring
from service.app.background import BackgroundWork
from service.core.settings import Environment, Settings
from service.jobs import enqueue, queue
from service.jobs.kinds import load_kinds
from service.jobs.purge import PURGE_DONE, schedule_purge, today
from service.jobs.worker import Worker
from service.runtime.providers import Runtime, build_runtime, close_runtime
from service.store.tables import Job

RETENTION_DAYS = 7


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    LocalKeyring.create(tmp_path / "keyring.json")
    return Settings(
        env=Environment.test,
        database_url=database_url,
        public_base_url="https://mhr.test",
        deployment_name="mhr.test/purge",
        keyring_path=tmp_path / "keyring.json",
        job_poll_seconds=0.05,
        done_job_retention_days=RETENTION_DAYS,
    )


async def _job_in_state(runtime: Runtime, key: str, state: str, days_ago: float) -> int:
    async with runtime.database.transaction() as session:
        job_id = await enqueue(session, EFFECT, Effect(), key)
        await session.execute(
            sa.update(Job)
            .where(Job.id == job_id)
            .values(state=state, updated_at=datetime.now(UTC) - timedelta(days=days_ago))
        )
    return job_id


async def _purges(runtime: Runtime) -> list[queue.JobView]:
    async with runtime.database.reading() as session:
        return await queue.list_jobs(session, kind=PURGE_DONE.name)


async def _keys(runtime: Runtime) -> set[str]:
    async with runtime.database.reading() as session:
        return set(
            (await session.execute(sa.select(Job.idempotency_key).where(Job.kind == EFFECT.name))).scalars()
        )


def test_the_purge_deletes_only_done_jobs_past_the_retention_and_schedules_the_next_day(
    settings: Settings,
) -> None:
    async def scenario() -> None:
        runtime = build_runtime(settings)
        try:
            await _job_in_state(runtime, "old-done", queue.DONE, RETENTION_DAYS + 1)
            await _job_in_state(runtime, "young-done", queue.DONE, RETENTION_DAYS - 1)
            await _job_in_state(runtime, "old-dead", queue.DEAD, RETENTION_DAYS * 10)
            await _job_in_state(runtime, "old-queued", queue.QUEUED, RETENTION_DAYS * 10)
            day = today()
            async with runtime.database.transaction() as session:
                await schedule_purge(session, day)
            worker = Worker(runtime, load_kinds(), name="purge")
            assert await worker.run_one([PURGE_DONE.name]) is True
            assert await _keys(runtime) == {"young-done", "old-dead", "old-queued"}

            # Today's run is done and tomorrow's waits for its day: nothing more runs today.
            found = {p.idempotency_key: p for p in await _purges(runtime)}
            tomorrow = (day + timedelta(days=1)).isoformat()
            assert set(found) == {day.isoformat(), tomorrow}
            assert found[day.isoformat()].state == queue.DONE and found[tomorrow].state == queue.QUEUED
            assert await worker.run_one([PURGE_DONE.name]) is False
        finally:
            await close_runtime(runtime)

    asyncio.run(scenario())


def test_every_process_that_runs_workers_schedules_todays_purge_once_and_runs_it(settings: Settings) -> None:
    async def scenario() -> None:
        runtime = build_runtime(settings)
        try:
            await _job_in_state(runtime, "old-done", queue.DONE, RETENTION_DAYS + 1)
            # Two processes starting (replicas): one job for today between them, run by a worker.
            first, second = BackgroundWork(runtime, job_workers=1), BackgroundWork(runtime, job_workers=1)
            first.start()
            second.start()
            try:
                for _ in range(400):
                    states = {p.idempotency_key: p.state for p in await _purges(runtime)}
                    if states.get(today().isoformat()) == queue.DONE:
                        break
                    await asyncio.sleep(0.05)
            finally:
                await first.stop(5.0)
                await second.stop(5.0)
            assert states[today().isoformat()] == queue.DONE
            assert [p.idempotency_key for p in await _purges(runtime)].count(today().isoformat()) == 1
            assert await _keys(runtime) == set()
        finally:
            await close_runtime(runtime)

    asyncio.run(scenario())


def test_a_retention_below_one_day_is_refused() -> None:
    with pytest.raises(ValueError, match="done_job_retention_days"):
        Settings(env=Environment.test, done_job_retention_days=0)

"""Durable background work (service.jobs), on SQLite and PostgreSQL.

What an operator and a job's author rely on: a job exists exactly when the change that caused it
committed; it runs once; a worker killed with SIGKILL while holding a job loses nothing and
doubles nothing; a job that keeps failing ends dead with its reason, shown by ``mhr jobs list``
and retried by ``mhr jobs retry``; two workers never run the same job.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from jobs_testkinds import ALWAYS_FAILS, CRASHES, EFFECT, EFFECTS_DDL, IN_STEPS, Effect, Refusal
from mhr_testkit import EXAMPLES, Service, load_example, submit, sync_url, wait_for

from security.keys import LocalKeyring
from service.app.background import BackgroundWork
from service.cli.main import main as cli_main
from service.core.metrics import REGISTRY
from service.core.settings import Environment, Settings
from service.jobs import enqueue, queue
from service.jobs.kinds import JobKind, load_kinds
from service.jobs.worker import LeaseLost, Steps, Worker
from service.runtime.providers import Runtime, build_runtime, close_runtime
from service.store.tables import Job

REPO = Path(__file__).resolve().parents[1]
TEST_KINDS = ("jobs_testkinds",)


def _settings(database_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "env": Environment.test,
        "database_url": database_url,
        "public_base_url": "https://mhr.test",
        "deployment_name": "mhr.test/jobs",
        "keyring_path": tmp_path / "keyring.json",
        "job_modules": TEST_KINDS,
        "job_poll_seconds": 0.05,
        "job_lease_seconds": 30.0,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    engine = sa.create_engine(sync_url(database_url))
    with engine.begin() as conn:
        conn.execute(sa.text(EFFECTS_DDL))
        conn.execute(sa.text("DELETE FROM job_effects"))
    engine.dispose()
    if not (tmp_path / "keyring.json").exists():
        LocalKeyring.create(tmp_path / "keyring.json")
    return _settings(database_url, tmp_path)


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Runtime]:
    runtime = build_runtime(settings)
    try:
        yield runtime
    finally:
        await close_runtime(runtime)


def worker(runtime: Runtime, name: str = "test-worker") -> Worker:
    return Worker(runtime, load_kinds(TEST_KINDS), name=name)


async def effects(runtime: Runtime) -> list[tuple[str, int, str]]:
    async with runtime.database.reading() as session:
        rows = await session.execute(
            sa.text(
                "SELECT idempotency_key, attempt, note FROM job_effects ORDER BY idempotency_key, attempt"
            )
        )
        return [(k, int(a), n) for k, a, n in rows]


async def job(runtime: Runtime, job_id: int) -> queue.JobView:
    async with runtime.database.reading() as session:
        found = await queue.get_job(session, job_id)
    assert found is not None
    return found


def test_enqueue_in_a_rolled_back_transaction_leaves_no_job(settings: Settings) -> None:
    class Abort(Exception):
        pass

    async def scenario() -> None:
        async with running(settings) as runtime:
            with pytest.raises(Abort):
                async with runtime.database.transaction() as session:
                    await enqueue(session, EFFECT, Effect(), "rolled-back")
                    raise Abort
            async with runtime.database.reading() as session:
                assert await queue.list_jobs(session) == []
            assert await worker(runtime).run_one() is False
            assert await effects(runtime) == []

    asyncio.run(scenario())


def test_the_same_idempotency_key_is_one_job_and_it_runs_once(settings: Settings) -> None:
    async def scenario() -> None:
        async with running(settings) as runtime:
            async with runtime.database.transaction() as session:
                first = await enqueue(session, EFFECT, Effect(note="one"), "key-1")
            async with runtime.database.transaction() as session:
                again = await enqueue(session, EFFECT, Effect(note="two"), "key-1")
                other_kind = await enqueue(session, ALWAYS_FAILS, Refusal(), "key-1")
            assert again == first
            assert other_kind != first  # unique per kind, not across kinds
            w = worker(runtime)
            assert await w.run_one([EFFECT.name]) is True
            assert await w.run_one([EFFECT.name]) is False  # done is done
            assert await effects(runtime) == [("key-1", 1, "one")]
            done = await job(runtime, first)
            assert (done.state, done.attempts, done.lease_owner) == ("done", 1, "test-worker")
            # A key enqueued again after the job ran is still that one job: it does not run again.
            async with runtime.database.transaction() as session:
                assert await enqueue(session, EFFECT, Effect(), "key-1") == first
            assert await w.run_one([EFFECT.name]) is False

    asyncio.run(scenario())


def test_a_job_due_later_waits_and_a_payload_of_the_wrong_type_is_refused(settings: Settings) -> None:
    from datetime import timedelta

    async def scenario() -> None:
        async with running(settings) as runtime:
            async with runtime.database.transaction() as session:
                later = queue.utcnow() + timedelta(hours=1)
                await enqueue(session, EFFECT, Effect(), "later", run_after=later)
                with pytest.raises(TypeError):
                    await enqueue(session, EFFECT, Refusal(), "wrong")  # type: ignore[arg-type]
                with pytest.raises(ValueError, match="idempotency key"):
                    await enqueue(session, EFFECT, Effect(), "")
            assert await worker(runtime).run_one() is False
            assert await effects(runtime) == []

    asyncio.run(scenario())


def _cli_env(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    monkeypatch.setenv("MHR_ENV", "test")
    monkeypatch.setenv("MHR_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("MHR_KEYRING_PATH", str(settings.keyring_path))


def test_a_job_that_always_fails_ends_dead_with_its_reason_listed_and_retried(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def fail_until_dead() -> int:
        async with running(settings) as runtime:
            async with runtime.database.transaction() as session:
                job_id = await enqueue(session, ALWAYS_FAILS, Refusal(), "refused-1")
            w = worker(runtime)
            runs = 0
            deadline = time.monotonic() + 20
            while (await job(runtime, job_id)).state != "dead":
                assert time.monotonic() < deadline, "the job never went dead"
                if await w.run_one([ALWAYS_FAILS.name]):
                    runs += 1
                else:
                    await asyncio.sleep(0.02)  # the backoff
            assert runs == ALWAYS_FAILS.max_attempts
            # A failed attempt's effect was rolled back with it: nothing half-done is left.
            assert await effects(runtime) == []
            assert await w.run_one() is False  # dead jobs are not leased
            return job_id

    job_id = asyncio.run(fail_until_dead())
    _cli_env(monkeypatch, settings)
    assert cli_main(["jobs", "list", "--state", "dead"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(j["id"], j["kind"], j["state"], j["attempts"]) for j in listed] == [
        (job_id, "test.always-fails", "dead", 3)
    ]
    assert listed[0]["error_type"] == "JobError"
    assert listed[0]["error_message"] == "the test peer refused the delivery"
    assert cli_main(["jobs", "list", "--state", "queued"]) == 0
    assert json.loads(capsys.readouterr().out) == []

    assert cli_main(["jobs", "retry", str(job_id)]) == 0
    retried = json.loads(capsys.readouterr().out)
    assert (retried["state"], retried["attempts"]) == ("queued", 0)
    assert cli_main(["jobs", "retry", str(job_id)]) == 1  # only a dead job is retried
    assert "only a dead job is retried" in capsys.readouterr().err
    assert cli_main(["jobs", "retry", "999999"]) == 1
    assert "no job 999999" in capsys.readouterr().err


def test_an_unexpected_error_is_kept_as_its_type_only(settings: Settings) -> None:
    async def scenario() -> None:
        async with running(settings) as runtime:
            async with runtime.database.transaction() as session:
                job_id = await enqueue(session, CRASHES, Refusal(), "crash-1")
            assert await worker(runtime).run_one([CRASHES.name]) is True
            dead = await job(runtime, job_id)
            assert (dead.state, dead.error_type) == ("dead", "RuntimeError")
            assert "Jane" not in (dead.error_message or "") and "1980" not in (dead.error_message or "")

    asyncio.run(scenario())


def _jobs_metric(state: str) -> float | None:
    return REGISTRY.get_sample_value("mhr_jobs", {"kind": "test.effect", "state": state})


def test_job_counts_by_kind_and_state_are_a_metric(settings: Settings) -> None:
    async def scenario() -> None:
        async with running(settings) as runtime:
            async with runtime.database.transaction() as session:
                await enqueue(session, EFFECT, Effect(), "m-1")
                await enqueue(session, EFFECT, Effect(), "m-2")
            background = BackgroundWork(runtime, job_workers=0)
            await background.refresh_metrics()
            assert _jobs_metric("queued") == 2
            assert await worker(runtime).run_one([EFFECT.name])
            await background.refresh_metrics()
            assert _jobs_metric("queued") == 1
            assert _jobs_metric("done") == 1

    asyncio.run(scenario())


# --- a real worker process, killed with SIGKILL while it holds a job --------------------------


@pytest.fixture
def worker_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MHR_")}
    env.update(
        {
            "MHR_ENV": "test",
            "MHR_DATABASE_URL": settings.database_url,
            "MHR_PUBLIC_BASE_URL": "https://mhr.test",
            "MHR_DEPLOYMENT_NAME": "mhr.test/jobs",
            "MHR_KEYRING_PATH": str(settings.keyring_path),
            "MHR_JOB_MODULES": json.dumps(list(TEST_KINDS)),
            "MHR_JOB_LEASE_SECONDS": "2",
            "MHR_JOB_POLL_SECONDS": "0.1",
            "MHR_LOG_LEVEL": "INFO",
            "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")]).rstrip(
                os.pathsep
            ),
        }
    )
    return env


@pytest.fixture
def spawn_worker(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    started: list[subprocess.Popen[bytes]] = []

    def spawn() -> subprocess.Popen[bytes]:
        with (tmp_path / f"worker-{len(started)}.log").open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "service", "worker", "--workers", "1"],
                cwd=REPO,
                env=worker_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        started.append(process)
        return process

    yield spawn
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def test_a_worker_killed_holding_a_job_leaves_it_to_complete_exactly_once_after_restart(
    settings: Settings, spawn_worker: Any, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    gate = tmp_path / "never"  # never created: the first attempt blocks until it is killed

    async def enqueue_blocking() -> int:
        async with running(settings) as runtime, runtime.database.transaction() as session:
            return await enqueue(
                session,
                EFFECT,
                Effect(note="crash", block_first_attempt_until=str(gate), started=str(started)),
                "crash-once",
            )

    job_id = asyncio.run(enqueue_blocking())
    first = spawn_worker()
    wait_for(started.exists, 60, "the first attempt to start")
    assert started.read_text() == "1\n"
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=10)

    async def observe() -> tuple[queue.JobView, list[tuple[str, int, str]]]:
        async with running(settings) as runtime:
            return await job(runtime, job_id), await effects(runtime)

    held, seen = asyncio.run(observe())
    # The killed attempt's effect was never committed; its lease is still on the job.
    assert seen == []
    assert (held.state, held.attempts) == ("running", 1)

    second = spawn_worker()
    wait_for(lambda: asyncio.run(observe())[0].state == "done", 60, "the job to be taken over and done")
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=30) == 0
    done, seen = asyncio.run(observe())
    assert seen == [("crash-once", 2, "crash")]  # its effect once, from the second attempt
    assert done.attempts == 2


def test_sigterm_stops_leasing_and_gives_a_held_job_back(
    settings: Settings, spawn_worker: Any, worker_env: dict[str, str], tmp_path: Path
) -> None:
    """A drained worker's job is released, not left to its lease: the next worker runs it at once."""
    worker_env["MHR_GRACEFUL_SHUTDOWN_SECONDS"] = "1"
    worker_env["MHR_JOB_LEASE_SECONDS"] = "3600"  # a release, not an expiry, must hand it over
    started = tmp_path / "started"
    gate = tmp_path / "open"

    async def enqueue_blocking() -> int:
        async with running(settings) as runtime, runtime.database.transaction() as session:
            return await enqueue(
                session, EFFECT, Effect(block_first_attempt_until=str(gate), started=str(started)), "drained"
            )

    job_id = asyncio.run(enqueue_blocking())
    first = spawn_worker()
    wait_for(started.exists, 60, "the first attempt to start")
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=30) == 0

    async def observe() -> queue.JobView:
        async with running(settings) as runtime:
            return await job(runtime, job_id)

    released = asyncio.run(observe())
    assert (released.state, released.attempts) == ("queued", 0)
    gate.touch()
    second = spawn_worker()
    wait_for(lambda: asyncio.run(observe()).state == "done", 60, "the released job to be done")
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=30) == 0


# --- concurrency (PostgreSQL: several workers lease at once) ----------------------------------


@pytest.mark.postgres
def test_two_workers_never_run_the_same_job(postgres_url: str, tmp_path: Path) -> None:
    from mhr_testkit import truncate_postgres

    truncate_postgres(postgres_url)
    engine = sa.create_engine(sync_url(postgres_url))
    with engine.begin() as conn:
        conn.execute(sa.text(EFFECTS_DDL))
        conn.execute(sa.text("DELETE FROM job_effects"))
    engine.dispose()
    LocalKeyring.create(tmp_path / "keyring.json")
    settings = _settings(postgres_url, tmp_path)
    jobs = 40

    async def scenario() -> None:
        async with running(settings) as runtime:
            async with runtime.database.transaction() as session:
                for n in range(jobs):
                    await enqueue(session, EFFECT, Effect(seconds=0.02), f"c-{n}")
            # Two leases taken at once, each in its own open transaction: never the same job.
            async with runtime.database.transaction() as a, runtime.database.transaction() as b:
                kinds = [EFFECT.name]
                attempts = {EFFECT.name: 3}
                first = await queue.lease_one(a, kinds, owner="a", lease_seconds=30, max_attempts=attempts)
                second = await queue.lease_one(b, kinds, owner="b", lease_seconds=30, max_attempts=attempts)
                assert isinstance(first, queue.Lease) and isinstance(second, queue.Lease)
                assert first.job_id != second.job_id
                await a.rollback()
                await b.rollback()
            workers = [worker(runtime, f"w{i}") for i in range(4)]

            async def drain(w: Worker) -> None:
                while await w.run_one(kinds):
                    pass

            await asyncio.gather(*(drain(w) for w in workers))
            seen = await effects(runtime)
            assert sorted(k for k, _a, _n in seen) == sorted(f"c-{n}" for n in range(jobs))
            assert {a for _k, a, _n in seen} == {1}  # no job was run twice, or retried
            async with runtime.database.reading() as session:
                owners = set((await session.execute(sa.select(Job.lease_owner))).scalars())
                states = set((await session.execute(sa.select(Job.state))).scalars())
            assert states == {"done"}
            assert len(owners) > 1  # the work was actually shared

    asyncio.run(scenario())


# --- the real kind: records.relabel, one job per migrant ---------------------------------------


def test_relabel_in_the_background_is_one_job_per_migrant_done_by_the_workers(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if not EXAMPLES:
        pytest.skip("no example exams in fhir/examples")
    with Service.start(database_url, tmp_path, job_workers=0) as service:
        clinic = service.register("clinic", "clinic")
        for path in EXAMPLES[:2]:
            assert submit(service, clinic, load_example(path)).status_code == 200
    _cli_env(monkeypatch, service.settings)
    assert cli_main(["records", "relabel", "--background", "--run-id", "rules-2026-12"]) == 0
    enqueued = json.loads(capsys.readouterr().out)
    assert enqueued["jobs"] >= 1
    assert cli_main(["records", "relabel", "--background", "--run-id", "rules-2026-12"]) == 0
    capsys.readouterr()
    settings = _settings(database_url, tmp_path, job_modules=())

    async def scenario() -> None:
        async with running(settings) as runtime:
            async with runtime.database.reading() as session:
                listed = await queue.list_jobs(session, kind="records.relabel")
            assert len(listed) == enqueued["jobs"]  # the same run enqueued twice: once
            assert all(set(j.payload) == {"subject_id"} for j in listed)
            w = Worker(runtime, load_kinds(), name="relabel")
            while await w.run_one(["records.relabel"]):
                pass
            async with runtime.database.reading() as session:
                states = {j.state for j in await queue.list_jobs(session, kind="records.relabel")}
            assert states == {"done"}

    asyncio.run(scenario())


# --- inside the server: the app's lifespan runs the workers -----------------------------------


def test_the_server_runs_jobs_in_the_background_and_stops_leasing_when_draining(
    settings: Settings, tmp_path: Path
) -> None:
    from service.core.lifecycle import SHUTDOWN

    with Service.start(
        settings.database_url, tmp_path, job_modules=TEST_KINDS, job_poll_seconds=0.05, job_workers=2
    ) as service:

        async def enqueue_one(key: str) -> int:
            async with running(settings) as runtime, runtime.database.transaction() as session:
                return await enqueue(session, EFFECT, Effect(), key)

        async def state(job_id: int) -> str:
            async with running(settings) as runtime:
                return (await job(runtime, job_id)).state

        first = asyncio.run(enqueue_one("served-1"))
        wait_for(lambda: asyncio.run(state(first)) == "done", 30, "the server's workers to run the job")
        assert service.client.get("/healthz").status_code == 200
        try:
            SHUTDOWN.begin("test: draining")
            time.sleep(0.3)  # an idle worker notices within its poll interval
            second = asyncio.run(enqueue_one("served-2"))
            time.sleep(0.5)
            assert asyncio.run(state(second)) == "queued"  # a draining server leases nothing new
        finally:
            SHUTDOWN.reset()


def test_a_job_module_that_cannot_be_imported_is_a_clear_settings_error() -> None:
    from service.core.settings import SettingsError

    with pytest.raises(SettingsError, match="MHR_JOB_MODULES: cannot import 'no_such_jobs_module'"):
        load_kinds(("no_such_jobs_module",))


def test_a_job_whose_worker_dies_on_every_attempt_ends_dead_not_in_a_loop(settings: Settings) -> None:
    async def scenario() -> None:
        async with running(settings) as runtime:
            async with runtime.database.transaction() as session:
                job_id = await enqueue(session, EFFECT, Effect(), "dies-every-time")
            for attempt in range(1, EFFECT.max_attempts + 1):
                # A worker leases the job and vanishes: its lease simply runs out.
                async with runtime.database.transaction() as session:
                    leased = await queue.lease_one(
                        session,
                        [EFFECT.name],
                        owner=f"doomed-{attempt}",
                        lease_seconds=0.01,
                        max_attempts={EFFECT.name: 3},
                    )
                assert isinstance(leased, queue.Lease) and leased.attempt == attempt
                await asyncio.sleep(0.05)
            assert await worker(runtime).run_one([EFFECT.name]) is True
            dead = await job(runtime, job_id)
            assert (dead.state, dead.attempts, dead.error_type) == ("dead", 3, "LeaseExpired")
            assert await worker(runtime).run_one([EFFECT.name]) is False
            assert await effects(runtime) == []

    asyncio.run(scenario())


def test_mhr_worker_also_runs_the_audit_integrator(
    settings: Settings, spawn_worker: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.audit import log as audit_log

    _cli_env(monkeypatch, settings)
    assert cli_main(["orgs", "add", "--name", "Clinic for the integrator", "--kind", "clinic"]) == 0
    capsys.readouterr()

    async def sealed() -> int:
        async with running(settings) as runtime, runtime.database.reading() as session:
            return await audit_log.tree_size(session)

    assert asyncio.run(sealed()) == 0  # the admin action's audit entry is not sealed yet
    process = spawn_worker()
    wait_for(lambda: asyncio.run(sealed()) >= 1, 60, "the worker's integrator to seal the audit log")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


def test_a_kind_run_in_steps_commits_each_step_then_is_done(settings: Settings) -> None:
    async def scenario() -> None:
        async with running(settings) as runtime:
            async with runtime.database.transaction() as session:
                job_id = await enqueue(session, IN_STEPS, Effect(note="s"), "steps-1")
            assert await worker(runtime).run_one([IN_STEPS.name]) is True
            assert await effects(runtime) == [("steps-1", 1, "s:first"), ("steps-1", 1, "s:second")]
            assert (await job(runtime, job_id)).state == "done"

    asyncio.run(scenario())


def test_a_step_after_the_lease_was_taken_over_is_refused_and_rolled_back(settings: Settings) -> None:
    async def scenario() -> None:
        async with running(settings) as runtime:
            async with runtime.database.transaction() as session:
                job_id = await enqueue(session, IN_STEPS, Effect(note="s"), "steps-2")
            async with runtime.database.transaction() as session:
                lease = await queue.lease_one(
                    session, [IN_STEPS.name], owner="first", lease_seconds=30, max_attempts={IN_STEPS.name: 3}
                )
            assert isinstance(lease, queue.Lease)
            async with runtime.database.transaction() as session:  # another worker took it over
                await session.execute(
                    sa.update(Job).where(Job.id == job_id).values(lease_token="someone-else")
                )
            steps = Steps(runtime, lease)
            with pytest.raises(LeaseLost):
                async with steps.step(30.0) as session:
                    await session.execute(sa.text("INSERT INTO job_effects VALUES ('steps-2', 1, 'leaked')"))
            assert await effects(runtime) == []

    asyncio.run(scenario())


def test_a_kind_needs_exactly_one_handler() -> None:
    with pytest.raises(ValueError, match="exactly one of run and run_in_steps"):
        JobKind(name="test.neither", payload_type=Effect)
    with pytest.raises(ValueError, match="exactly one of run and run_in_steps"):
        JobKind(name="test.both", payload_type=Effect, run=EFFECT.run, run_in_steps=IN_STEPS.run_in_steps)


def test_an_idle_worker_wakes_when_a_due_job_commits_not_on_a_rollback(settings: Settings) -> None:
    """With a 30 s poll, the job runs within a second of the commit that enqueued it: the commit
    wakes this process's idle workers. A rolled-back enqueue wakes them to nothing."""
    slow_poll = Settings(**{**settings.model_dump(), "job_poll_seconds": 30.0})

    async def scenario() -> None:
        async with running(slow_poll) as runtime:
            w = worker(runtime)
            loop = asyncio.create_task(w.run())
            try:
                await asyncio.sleep(0.5)  # idle now, for 30 s
                with pytest.raises(RuntimeError):
                    async with runtime.database.transaction() as session:
                        await enqueue(session, EFFECT, Effect(note="gone"), "wake-0")
                        raise RuntimeError("rolled back")
                async with runtime.database.transaction() as session:
                    await enqueue(session, EFFECT, Effect(note="woken"), "wake-1")
                committed = time.monotonic()
                while not await effects(runtime):
                    assert time.monotonic() - committed < 5, "the idle worker was not woken"
                    await asyncio.sleep(0.05)
                assert await effects(runtime) == [("wake-1", 1, "woken")]
            finally:
                w.stopping.set()
                await asyncio.wait_for(loop, 10)

    asyncio.run(scenario())


def test_a_job_enqueued_by_another_process_wakes_an_idle_worker_at_once(
    settings: Settings, worker_env: dict[str, str], spawn_worker: Any, tmp_path: Path
) -> None:
    """`mhr worker` polls every 30 s here, yet runs a job another process enqueued within a
    second or two of its commit: PostgreSQL's NOTIFY wakes it. The listening connection, cut
    by the server, is replaced, and wakes the worker again."""
    if settings.database_url.startswith("sqlite"):
        pytest.skip("SQLite has no NOTIFY: another process's workers find a job on their next poll")
    from service.jobs.listener import APPLICATION_NAME, RECONNECT_SECONDS

    worker_env["MHR_JOB_POLL_SECONDS"] = "30"
    engine = sa.create_engine(sync_url(settings.database_url))

    def listening() -> int:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    sa.text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"),
                    {"name": APPLICATION_NAME},
                ).scalar_one()
            )

    async def enqueue_one(key: str) -> None:
        async with running(settings) as runtime, runtime.database.transaction() as session:
            await enqueue(session, EFFECT, Effect(note=key), key)

    async def done() -> list[str]:
        async with running(settings) as runtime:
            return [k for k, _a, _n in await effects(runtime)]

    def run_soon(key: str) -> float:
        time.sleep(1.0)  # the worker has looked and found nothing: idle for 30 s now
        asyncio.run(enqueue_one(key))
        committed = time.monotonic()
        wait_for(lambda: key in asyncio.run(done()), 10, f"the worker to run {key}")
        return time.monotonic() - committed

    try:
        spawn_worker()
        wait_for(lambda: listening() == 1, 30, "the worker's listening connection")
        assert run_soon("notified-1") < 5

        with engine.connect() as conn:
            conn.execute(
                sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :n"),
                {"n": APPLICATION_NAME},
            )
        wait_for(lambda: listening() == 0, 10, "the listening connection to be cut")
        wait_for(lambda: listening() == 1, 3 * RECONNECT_SECONDS + 10, "a new listening connection")
        assert run_soon("notified-2") < 5
    finally:
        engine.dispose()

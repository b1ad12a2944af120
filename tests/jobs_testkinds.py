"""Job kinds for the tests only, registered when a process lists this module in MHR_JOB_MODULES.

Their effect is a row in ``job_effects`` (a table the tests create), written through the job's
session: it commits with the job's completion or not at all, as a real handler's effect does.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from service.jobs import JobContext, JobError, JobKind
from service.jobs.kinds import JobPayload, JobSteps, register

EFFECTS_DDL = (
    "CREATE TABLE IF NOT EXISTS job_effects ("
    " idempotency_key VARCHAR(200) NOT NULL, attempt INTEGER NOT NULL, note VARCHAR(100) NOT NULL)"
)


class Effect(JobPayload):
    note: str = "effect"
    # While this file does not exist, the first attempt writes its effect, creates ``started``
    # and then blocks (uncommitted) until the process is killed.
    block_first_attempt_until: str | None = None
    started: str | None = None
    seconds: float = 0.0


async def _effect(job: JobContext[Effect], session: AsyncSession) -> None:
    await session.execute(
        sa.text("INSERT INTO job_effects (idempotency_key, attempt, note) VALUES (:k, :a, :n)"),
        {"k": job.idempotency_key, "a": job.attempt, "n": job.payload.note},
    )
    if job.payload.started:
        await asyncio.to_thread(Path(job.payload.started).write_text, f"{job.attempt}\n")
    gate = job.payload.block_first_attempt_until
    if gate and job.attempt == 1:
        # A file, not an event: the test that opens the gate is another process.
        while not await asyncio.to_thread(Path(gate).exists):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    if job.payload.seconds:
        await asyncio.sleep(job.payload.seconds)


class Refusal(JobPayload):
    pass


async def _always_fails(job: JobContext[Refusal], session: AsyncSession) -> None:
    await session.execute(
        sa.text("INSERT INTO job_effects (idempotency_key, attempt, note) VALUES (:k, :a, 'refused')"),
        {"k": job.idempotency_key, "a": job.attempt},
    )
    raise JobError("the test peer refused the delivery")


async def _crashes(job: JobContext[Refusal], session: AsyncSession) -> None:
    raise RuntimeError("patient Jane Doe, born 1980-01-01")  # text that must never be stored


EFFECT = register(JobKind(name="test.effect", payload_type=Effect, run=_effect, max_attempts=3))
ALWAYS_FAILS = register(
    JobKind(
        name="test.always-fails",
        payload_type=Refusal,
        run=_always_fails,
        max_attempts=3,
        backoff_base_seconds=0.01,
        backoff_cap_seconds=0.05,
    )
)
CRASHES = register(JobKind(name="test.crashes", payload_type=Refusal, run=_crashes, max_attempts=1))


async def _in_steps(job: JobContext[Effect], steps: JobSteps) -> None:
    """Two effects, each committed by a step of its own before the job is marked done."""
    for step in ("first", "second"):
        async with steps.step(30.0) as session:
            await session.execute(
                sa.text("INSERT INTO job_effects (idempotency_key, attempt, note) VALUES (:k, :a, :n)"),
                {"k": job.idempotency_key, "a": job.attempt, "n": f"{job.payload.note}:{step}"},
            )


IN_STEPS = register(
    JobKind(name="test.in-steps", payload_type=Effect, run_in_steps=_in_steps, max_attempts=3)
)

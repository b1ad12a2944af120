"""``mhr keys rotate-index | reindex | retire-index``: the operator's side of index_rotation."""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from service.jobs import queue
from service.jobs.kinds import REGISTRY, load_kinds
from service.keys.index_rotation import (
    Audit,
    IndexRotationRefused,
    left_to_reindex,
    retire_index,
    rotate_index,
    wait_settled,
)
from service.keys.progress import Progress
from service.keys.reindex_job import REINDEX_BATCH, start_reindex
from service.records.index_keys import read_phase
from service.store.tables import Job

if TYPE_CHECKING:
    from service.runtime.providers import Runtime

POLL_SECONDS = 0.5
UNIT = "migrants re-indexed"


async def _run_state(runtime: Runtime, target_kid: str, run_id: str) -> dict[str, int]:
    async with runtime.database.reading() as session:
        rows = await session.execute(
            select(Job.state, func.count())
            .where(
                Job.kind == REINDEX_BATCH.name,
                Job.idempotency_key.startswith(f"{target_kid}:{run_id}:", autoescape=True),
            )
            .group_by(Job.state)
        )
        return {state: int(n) for state, n in rows.all()}


async def work_here(runtime: Runtime, target_kid: str, run_id: str, progress: Progress, total: int) -> int:
    """Work the run's batches in this process (beside any other worker) until it ends; 0 or 1 (dead)."""
    from service.jobs.worker import Worker, worker_name

    load_kinds(runtime.settings.job_modules)
    await wait_settled(runtime)
    worker = Worker(runtime, REGISTRY, name=worker_name(0) + ":reindex")
    while True:
        worked = await worker.run_one([REINDEX_BATCH.name])
        states = await _run_state(runtime, target_kid, run_id)
        async with runtime.database.reading() as session:
            left = await left_to_reindex(session, target_kid)
        finished = not states.get(queue.QUEUED) and not states.get(queue.RUNNING)
        progress.update(max(0, total - left), final=finished)
        if finished:
            if states.get(queue.DEAD):
                print(
                    "error: the run stopped at a dead job: see `mhr jobs list --state dead`", file=sys.stderr
                )
                return 1
            return 0
        if not worked:
            await asyncio.sleep(POLL_SECONDS)


async def run_index_action(args: argparse.Namespace, runtime: Runtime, audit: Audit) -> int:
    database, keys = runtime.database, runtime.keys
    now = datetime.now(UTC)
    if args.action == "retire-index":
        done = await retire_index(database, keys, audit, now=now, forget_exam_keys=args.forget_exam_keys)
        print(
            f"index key {done.kid} destroyed; {done.forgotten_requests} remembered requests "
            "under it forgotten"
        )
        print("search cursors issued under it are now refused (400): a client runs its search again")
        return 0
    if args.batch_size < 1:
        print("error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    if args.action == "rotate-index":
        phase = await rotate_index(database, keys, audit, now=now)
        print(
            f"index key {phase.current} made; {phase.previous} stays in use beside it until every migrant "
            "is moved. Lookups use both from now on (every process re-reads this within a second)."
        )
    else:
        async with database.reading() as session:
            phase = await read_phase(session, keys)
        if phase.previous is None:
            raise IndexRotationRefused(
                "no index key rotation is under way: start one with `mhr keys rotate-index`"
            )
    run_id = args.run_id or uuid.uuid4().hex
    async with database.transaction() as session:
        total = await left_to_reindex(session, phase.current)
        await start_reindex(session, run_id, phase.current, args.batch_size)
    print(f"reindex run {run_id}: {total} migrants to move to index key {phase.current}", flush=True)
    if not args.wait:
        print("queued: the workers of `mhr serve` / `mhr worker` do it; follow with `mhr keys status`")
        return 0
    code = await work_here(runtime, phase.current, run_id, Progress(sys.stdout, total, UNIT), total)
    if code == 0:
        async with database.reading() as session:
            left = await left_to_reindex(session, phase.current)
        if left:
            print(
                f"{left} migrants still under {phase.previous}: run `mhr keys reindex --wait` again; "
                "a migrant whose stored data failed its integrity check stays (logged as "
                "event integrity, with the version's coordinates)"
            )
        else:
            print(
                f"every migrant is under {phase.current}: "
                f"`mhr keys retire-index` may destroy {phase.previous}"
            )
    return code

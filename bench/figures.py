"""What one completion-figures report costs as the follow-up table grows.

    python -m bench.figures                       # 10,000 and 100,000 tasks, 7 rounds each
    python -m bench.figures --tasks 50000 --rounds 5

In-process, on a scratch PostgreSQL database of its own (``postgres@127.0.0.1:5432``,
created, migrated and dropped by the run). The tasks are spread over 20 authorities and 40
clinics with clock starts over three years; one report is one authority's (or one clinic's)
year: the counts query and the median query of ``service.figures.repository``. Prints the
median wall time over rounds in milliseconds, per table size and perspective. A
measurement, not a test: results go to stdout and ``bench/results/figures.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from service.figures.counts import Perspective
from service.figures.period import parse_period
from service.figures.repository import completion_figures
from service.store import migrate
from service.store.database import Database
from service.store.tables import FollowupTask, FollowupTransfer, Subject

SERVER = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
RESULTS = Path(__file__).parent / "results"
AUTHORITIES = [f"bench-authority-{i}" for i in range(20)]
CLINICS = [f"bench-clinic-{i}" for i in range(40)]


def _rows(
    count: int, subject: str, rng: random.Random
) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    tasks: list[dict[str, object]] = []
    transfers: list[dict[str, object]] = []
    now = datetime.now(UTC)
    for _ in range(count):
        task_id = str(uuid.uuid4())
        owner = rng.choice(AUTHORITIES)
        authored = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(minutes=rng.randrange(3 * 365 * 24 * 60))
        arrival = None if rng.random() < 0.1 else authored.date() + timedelta(days=rng.randrange(60))
        start = arrival or authored.date()
        evaluated = start + timedelta(days=rng.randrange(500)) if rng.random() < 0.65 else None
        lost = evaluated is None and rng.random() < 0.4
        tasks.append(
            {
                "id": task_id,
                "subject_id": subject,
                "focus_id": str(uuid.uuid4()),
                "origin_org": owner,
                "owner_org": owner,
                "requester_org": rng.choice(CLINICS),
                "code": "tb-followup",
                "status": "completed" if evaluated else "failed" if lost else "in-progress",
                "business_status": "lost-to-follow-up" if lost else None,
                "authored_at": authored,
                "arrival_date": arrival,
                "due_date": start + timedelta(days=30),
                "evaluated_on": evaluated,
                "closed_at": None,
                "outcome": None if evaluated is None else rng.choice(("confirmed", "confirmed", "revised")),
                "updated_at": now,
            }
        )
        if rng.random() < 0.03:
            to = rng.choice(AUTHORITIES)
            tasks[-1]["owner_org"] = to
            transfers.append({"task_id": task_id, "from_org": owner, "to_org": to, "at": now})
    return tasks, transfers


async def _measure(url: str, sizes: list[int], rounds: int) -> dict[str, dict[str, float]]:
    engine = create_async_engine(url)
    rng = random.Random(16)
    subject = "bench-subject"
    async with engine.begin() as conn:
        await conn.execute(
            sa.insert(Subject.__table__), [{"id": subject, "key_version": 1, "created_at": datetime.now(UTC)}]
        )
    await engine.dispose()
    database = Database(url)
    period = parse_period("2026", "2026")
    results: dict[str, dict[str, float]] = {}
    held = 0
    try:
        for size in sizes:
            tasks, transfers = _rows(size - held, subject, rng)
            async with database.transaction() as session:
                for chunk in range(0, len(tasks), 5000):
                    await session.execute(sa.insert(FollowupTask.__table__), tasks[chunk : chunk + 5000])
                if transfers:
                    await session.execute(sa.insert(FollowupTransfer.__table__), transfers)
                await session.execute(sa.text("ANALYZE followup_tasks"))
            held = size
            for perspective, organization in (
                (Perspective.authority, AUTHORITIES[3]),
                (Perspective.clinic, CLINICS[7]),
            ):
                timings = []
                for _ in range(rounds):
                    async with database.sessions() as session:
                        began = time.perf_counter()
                        figures = await completion_figures(session, organization, perspective, period)
                        timings.append((time.perf_counter() - began) * 1000)
                median = statistics.median(timings)
                results[f"{size} tasks, {perspective.value}"] = {
                    "median_ms": round(median, 2),
                    "cases": figures.cases,
                }
                print(
                    f"{size:>7} tasks  {perspective.value:<9}  cases {figures.cases:>5}"
                    f"  median {median:8.2f} ms"
                )
    finally:
        await database.dispose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, action="append", help="table sizes (default 10000 and 100000)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    sizes = sorted(args.tasks or [10_000, 100_000])
    name = f"mhr_bench_figures_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(SERVER.replace("+asyncpg", "+psycopg"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = SERVER.rsplit("/", 1)[0] + f"/{name}"
    try:
        migrate.upgrade(url)
        results = asyncio.run(_measure(url, sizes, args.rounds))
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "figures.json").write_text(
        json.dumps({"date": date.today().isoformat(), "rounds": args.rounds, "results": results}, indent=2)
        + "\n"
    )


if __name__ == "__main__":
    main()

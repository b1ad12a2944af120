"""Profile export steps in-process (a dev tool): ``--steps`` steps of a fresh export as authority A,
in one transaction that is rolled back, so the database is left as it was.

    .venv/bin/python -m bench.export_profile --db mhr_bench_scale --state bench/.state/scale --steps 5

Prints resources/s over the steps and, with ``--pyinstrument`` (a dev tool: ``pip install
pyinstrument``), the profile of them.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import event, text

from bench.bulk_load import _settings
from bench.parties import load
from service.bulk.files import new_file_key
from service.bulk.parameters import EXPORTED_TYPES
from service.bulk.step import QUEUED, run_step
from service.runtime.providers import build_runtime, close_runtime
from service.store.tables import BulkExport


async def _steps(db: str, state: Path, steps: int, per_step: int, profiler: Any) -> dict[str, Any]:
    settings = _settings(db, state / "keyring.json").model_copy(
        update={
            "export_dir": Path(tempfile.mkdtemp(prefix="mhr-export-profile-")),
            "export_subjects_per_step": per_step,
        }
    )
    runtime = build_runtime(settings)
    sql_times: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    engine = runtime.database.engine.sync_engine

    @event.listens_for(engine, "before_cursor_execute")
    def _before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        conn.info["began"] = time.perf_counter()

    @event.listens_for(engine, "after_cursor_execute")
    def _after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        slot = sql_times[" ".join(statement.split())[:90]]
        slot[0] += 1
        slot[1] += time.perf_counter() - conn.info["began"]

    authority = load(state)["authority-a"]
    resources = subjects = 0
    try:
        async with runtime.database.transaction() as session:
            export_id = secrets.token_urlsafe(24)
            wrapped, _ = new_file_key(runtime.keys, export_id)
            now = datetime.now(UTC)
            session.add(
                BulkExport(
                    id=export_id,
                    client_id=authority.client_id,
                    organization_id=authority.organization_id,
                    purpose="PUBHLTH",
                    group_id=None,
                    types=list(EXPORTED_TYPES),
                    since=None,
                    until=now,
                    request_url="profile",
                    state=QUEUED,
                    wrapped_key=wrapped,
                    cursor_subject=None,
                    subjects_done=0,
                    resources_done=0,
                    created_at=now,
                )
            )
            await session.flush()
            await run_step(session, runtime, export_id)  # warm: statements compiled, caches filled
            backend = psutil.Process(
                int((await session.execute(text("SELECT pg_backend_pid()"))).scalar_one())
            )
            db_cpu = sum(backend.cpu_times()[:2])
            if profiler is not None:
                profiler.start()
            began = time.perf_counter()
            cpu = time.process_time()
            for _ in range(steps):
                result = await run_step(session, runtime, export_id)
                resources += result.resources
                subjects += result.subjects
            seconds = time.perf_counter() - began
            cpu = time.process_time() - cpu
            db_cpu = sum(backend.cpu_times()[:2]) - db_cpu
            if profiler is not None:
                profiler.stop()
            await session.rollback()
    finally:
        await close_runtime(runtime)
    for statement, (count, spent) in sorted(sql_times.items(), key=lambda kv: -kv[1][1])[:12]:
        print(f"{spent:7.2f} s {count:5d}x  {statement}")
    return {
        "steps": steps,
        "subjects": subjects,
        "resources": resources,
        "seconds": round(seconds, 2),
        "resources_per_s": round(resources / seconds, 1),
        # This process's CPU alone (not the database's): what the steps cost on a loaded machine.
        "process_cpu_s": round(cpu, 2),
        "resources_per_process_cpu_s": round(resources / cpu, 1),
        "database_backend_cpu_s": round(db_cpu, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", required=True)
    parser.add_argument(
        "--state", type=Path, required=True, help="directory with keyring.json and parties.json"
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--per-step", type=int, default=200)
    parser.add_argument("--pyinstrument", type=Path, help="write the profile here (text)")
    args = parser.parse_args()
    profiler = None
    if args.pyinstrument:
        from pyinstrument import Profiler

        profiler = Profiler(async_mode="disabled")
    print(asyncio.run(_steps(args.db, args.state, args.steps, args.per_step, profiler)))
    if profiler is not None:
        args.pyinstrument.write_text(profiler.output_text(unicode=False, show_all=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

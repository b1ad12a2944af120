"""``mhr tasks overdue``: raise the overdue follow-up tasks now, without waiting for the daily job.

The durable ``tasks.overdue`` job does this every day on its own. An operator runs it by hand
after a long outage (to raise at once what the missed days would have), and ``--as-of`` raises
what would be overdue on a later day, which is how the README's demo shows an overdue notice
without waiting 30 days. Each task is raised once per due date, whoever runs the sweep.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, date, datetime

from service.core.settings import Settings
from service.records.repository import RecordRepository
from service.store.database import Database
from service.tasks.overdue_job import mark_overdue


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tasks = subparsers.add_parser("tasks", help="follow-up tasks")
    actions = tasks.add_subparsers(dest="action", required=True)
    overdue = actions.add_parser("overdue", help="raise every open task past its due date, once per due date")
    overdue.add_argument("--as-of", help="the day to judge due dates by (YYYY-MM-DD; default: today, UTC)")
    overdue.set_defaults(handler=cmd_overdue)


def cmd_overdue(args: argparse.Namespace, settings: Settings) -> int:
    try:
        as_of = date.fromisoformat(args.as_of) if args.as_of else datetime.now(UTC).date()
    except ValueError:
        print(f"mhr: --as-of {args.as_of!r} is not a date (YYYY-MM-DD)", file=sys.stderr)
        return 2

    async def run() -> int:
        database = Database(settings.database_url)
        try:
            async with database.transaction() as session:
                return await mark_overdue(RecordRepository(session), as_of)
        finally:
            await database.dispose()

    raised = asyncio.run(run())
    print(f"{raised} task(s) raised as overdue as of {as_of.isoformat()}")
    return 0

"""``mhr keys rotate | rewrap | status | retire``: the operator's side of service.keys.lifecycle."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from service.jobs import queue
from service.keys import lifecycle
from service.keys.index_rotation import IndexRotationRefused, IndexStatus
from service.keys.progress import Progress
from service.keys.reindex_job import DEFAULT_BATCH as REINDEX_BATCH_SIZE
from service.keys.rewrap_job import DEFAULT_BATCH
from service.keys.status import KekStatus

if TYPE_CHECKING:
    from service.core.settings import Settings
    from service.runtime.providers import Runtime

ACTIONS = ("rotate", "rewrap", "status", "retire", "adopt", "rotate-index", "reindex", "retire-index")
FOLLOW_UP_PASSES = 3


def add_arguments(keys_parser: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    keys_parser.add_parser("rotate", help="make a new KEK version the one new writes use")
    rewrap = keys_parser.add_parser(
        "rewrap", help="re-wrap every subject key under the current KEK (background jobs, online)"
    )
    rewrap.add_argument("--wait", action="store_true", help="work the batches here too and show progress")
    rewrap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="subject keys per job")
    rewrap.add_argument("--run-id", help="name the run (default: a new one)")
    keys_parser.add_parser("status", help="subject keys per KEK version; current and minimum versions")
    retire = keys_parser.add_parser("retire", help="destroy the KEK versions below N (irreversible)")
    retire.add_argument("--below", type=int, required=True, metavar="N")
    retire.add_argument(
        "--force", action="store_true", help="even if live subject keys are still wrapped under them"
    )
    for name, what in (
        ("rotate-index", "make a new blind-index key and move every migrant's index tokens to it (online)"),
        ("reindex", "queue (again) the moving of migrants still under the previous index key"),
    ):
        parser = keys_parser.add_parser(name, help=what)
        parser.add_argument("--wait", action="store_true", help="work the batches here too and show progress")
        parser.add_argument("--batch-size", type=int, default=REINDEX_BATCH_SIZE, help="migrants per job")
        parser.add_argument("--run-id", help="name the run (default: a new one)")
    retire_index = keys_parser.add_parser(
        "retire-index", help="destroy the previous blind-index key once no migrant is under it (irreversible)"
    )
    retire_index.add_argument(
        "--forget-exam-keys",
        action="store_true",
        help="forget exam submissions remembered under it (they cannot be re-keyed)",
    )
    adopt = keys_parser.add_parser(
        "adopt",
        help="after restoring a backup into MHR_DATABASE_URL: take its subject keys from the live database",
    )
    adopt.add_argument("--from", dest="live_url", required=True, metavar="LIVE_DATABASE_URL")


def _print_status(found: KekStatus, index: IndexStatus | None = None) -> None:
    out = found.as_json()
    if index is not None:
        out["blind_index"] = index.as_json()
    print(json.dumps(out, indent=2))


def run(args: argparse.Namespace, settings: Settings, audit: lifecycle.Audit) -> int:
    from service.runtime.providers import build_runtime, close_runtime, open_keyring

    # A token is opened read-write only for the commands that create or destroy a key.
    writable = args.action in ("rotate", "retire", "rotate-index", "retire-index")

    async def work() -> int:
        runtime = build_runtime(settings, keys=open_keyring(settings, writable=writable))
        try:
            return await _dispatch(args, runtime, audit)
        finally:
            await close_runtime(runtime)

    try:
        return asyncio.run(work())
    except lifecycle.KeyLifecycleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except IndexRotationRefused as exc:
        print(f"mhr: refused: {exc}", file=sys.stderr)
        return 1


async def _dispatch(args: argparse.Namespace, runtime: Runtime, audit: lifecycle.Audit) -> int:
    database, keys = runtime.database, runtime.keys
    if args.action == "rotate":
        ref = await lifecycle.rotate(database, keys, audit)
        print(
            f"KEK v{ref.version} is now current: new subject keys are wrapped under it. Re-wrap the "
            "existing ones with `mhr keys rewrap --wait`; running servers take it up as they rewrap "
            "or restart."
        )
        return 0
    if args.action == "status":
        from service.keys.index_rotation import index_status

        async with database.reading() as session:
            index = await index_status(session, keys, datetime.now(UTC))
        _print_status(await lifecycle.status(database, keys), index)
        return 0
    if args.action in ("rotate-index", "reindex", "retire-index"):
        from service.keys.index_commands import run_index_action

        return await run_index_action(args, runtime, audit)
    if args.action == "adopt":
        from service.keys.restore import adopt_live_subject_keys
        from service.store.database import Database

        live = Database(args.live_url)
        try:
            found = await lifecycle.status(database, keys)
            done = await adopt_live_subject_keys(
                database, live, keys.current_kek().key_id, found.min_decrypt, audit
            )
        finally:
            await live.dispose()
        print(
            f"restored copy: {done.subjects} subject keys taken from the live database; "
            f"{done.erased} migrants erased there (or absent) are unreadable here too"
        )
        return 0
    if args.action == "retire":
        destroyed, stranded = await lifecycle.retire(database, keys, args.below, audit, force=args.force)
        names = ", ".join(f"v{v}" for v in destroyed) or "none (already retired)"
        print(f"destroyed KEK versions: {names}; minimum decryption version is now v{args.below}")
        if stranded:
            print(f"warning: {stranded} live subject keys are under retired versions and cannot be read")
        return 0
    if args.batch_size < 1:
        print("error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    run_id = args.run_id or uuid.uuid4().hex
    started = await lifecycle.start(database, keys, run_id, args.batch_size)
    print(
        f"rewrap run {run_id}: {started.to_rewrap} subject keys to re-wrap "
        f"under KEK v{started.target_version}",
        flush=True,
    )
    if not args.wait:
        print("queued: the workers of `mhr serve` / `mhr worker` do it; follow with `mhr keys status`")
        return 0
    for attempt in range(1, FOLLOW_UP_PASSES + 2):
        states = await lifecycle.wait(runtime, started, Progress(sys.stdout, started.to_rewrap))
        if states.get(queue.DEAD):
            print("error: the run stopped at a dead job: see `mhr jobs list --state dead`", file=sys.stderr)
            return 1
        found = await lifecycle.status(database, keys)
        # A key wrapped under the old version by a write that committed behind the run's cursor
        # (a process that had not yet taken up the rotation): another pass takes it.
        # Headers sealed under the old version by a process that had not yet taken it up, too.
        if (
            found.stale - found.under_retired <= 0
            and found.headers_stale <= found.headers_below(found.min_decrypt)
        ) or attempt > FOLLOW_UP_PASSES:
            break
        started = await lifecycle.start(database, keys, f"{run_id}.{attempt}", args.batch_size)
        print(f"another pass for {started.to_rewrap} subject keys written meanwhile", flush=True)
    if found.under_retired:
        print(f"warning: {found.under_retired} subject keys are under retired KEK versions (unreadable)")
    return 0

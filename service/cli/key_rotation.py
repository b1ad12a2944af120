"""CLI commands rotating the access-token key and the audit log key (``service.keys``).

``mhr keys rotate-token`` / ``mhr keys retire-token KID`` / ``mhr keys token-keys``, and
``mhr audit rotate-key`` / ``mhr audit keys``; registered by ``service.cli.main``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from security.keys import KeyProvider
from service.audit.log_keys import log_keys
from service.core.settings import Settings
from service.keys.log_key_rotation import rotate_log_key
from service.keys.secret_rotation import (
    RotationRefused,
    retire_after,
    retire_token_key,
    rotate_token_key,
    token_key_history,
)
from service.runtime.providers import open_keyring
from service.store.database import Database

__all__ = ["add_key_rotation_commands", "add_log_key_commands"]


def _run_with(settings: Settings, work: Callable[[Database, KeyProvider], Awaitable[int]]) -> int:
    """Open the keys writable and the database, run ``work(database, keys)``, close both."""
    keys = open_keyring(settings, writable=True)

    async def run() -> int:
        database = Database(settings.database_url)
        try:
            return await work(database, keys)
        finally:
            await database.dispose()

    try:
        return asyncio.run(run())
    except RotationRefused as exc:
        print(f"mhr: refused: {exc}", file=sys.stderr)
        return 1
    finally:
        keys.close()


def cmd_token_keys(args: argparse.Namespace, settings: Settings) -> int:
    lifetime = settings.token_lifetime_seconds
    now = datetime.now(UTC)

    async def rotate(database: Database, keys: KeyProvider) -> int:
        done = await rotate_token_key(database, keys, token_lifetime_seconds=lifetime, now=now)
        print(f"token key {done.current} now signs new access tokens; {done.previous} still verifies")
        print("restart every server (rolling) so that all of them sign with the new key;")
        print(
            f"then, after {done.retire_after.isoformat(timespec='seconds')}: "
            f"mhr keys retire-token {done.previous}"
        )
        return 0

    async def retire(database: Database, keys: KeyProvider) -> int:
        await retire_token_key(database, keys, args.kid, token_lifetime_seconds=lifetime, now=now)
        print(f"token key {args.kid} retired: tokens signed under it are refused (after servers restart)")
        return 0

    async def listing(database: Database, keys: KeyProvider) -> int:
        current = keys.token_key_id()
        rows = {row.key_id: row for row in await token_key_history(database)}
        out = []
        for check in keys.key_checks():
            if check.purpose != "token-hmac":
                continue
            row = rows.get(check.key_id)
            entry: dict[str, object] = {
                "kid": check.key_id,
                "status": "current" if check.key_id == current else "previous",
            }
            if row is not None and row.superseded_at is not None:
                entry["superseded_at"] = row.superseded_at.isoformat(timespec="seconds")
                entry["retire_after"] = retire_after(row.superseded_at, lifetime).isoformat(
                    timespec="seconds"
                )
            out.append(entry)
        print(json.dumps({"token_keys": out}, indent=2))
        return 0

    work = {"rotate-token": rotate, "retire-token": retire, "token-keys": listing}[args.action]
    return _run_with(settings, work)


def cmd_log_keys(args: argparse.Namespace, settings: Settings) -> int:
    from security.keys import CheckpointSigning
    from security.signed_note import NoteSigner

    name = settings.deployment_name

    async def rotate(database: Database, keys: KeyProvider) -> int:
        done = await rotate_log_key(database, keys, name, now=datetime.now(UTC))
        print(f"audit log key rotated: checkpoints of tree size {done.first_size} and later are signed by")
        print(done.current_vkey)
        print("restart every server (rolling); verify with the list from GET /audit/keys or `mhr audit keys`")
        return 0

    async def listing(database: Database, keys: KeyProvider) -> int:
        current = NoteSigner(name, CheckpointSigning(keys)).verifier()
        async with database.reading() as session:
            print(json.dumps((await log_keys(session, current)).as_json(), indent=2))
        return 0

    return _run_with(settings, rotate if args.action == "rotate-key" else listing)


def add_key_rotation_commands(keys_parser: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys_parser.add_parser(
        "rotate-token", help="a new access-token signing key; tokens under the previous one stay valid"
    ).set_defaults(handler=cmd_token_keys)
    retire = keys_parser.add_parser(
        "retire-token", help="destroy a previous access-token key once all its tokens have expired"
    )
    retire.add_argument("kid", help="the key id (`mhr keys token-keys`)")
    retire.set_defaults(handler=cmd_token_keys)
    keys_parser.add_parser(
        "token-keys", help="the access-token keys held, and when each previous one may be retired"
    ).set_defaults(handler=cmd_token_keys)


def add_log_key_commands(audit: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit.add_parser(
        "rotate-key", help="a new checkpoint signing key for every checkpoint after the latest"
    ).set_defaults(handler=cmd_log_keys)
    audit.add_parser(
        "keys", help="every log key with the tree sizes it signs (JSON, as GET /audit/keys)"
    ).set_defaults(handler=cmd_log_keys)

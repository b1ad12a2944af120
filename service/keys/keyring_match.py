"""The database names the keys its data needs; a keyring that does not hold them is refused.

A service started with the wrong keyring (a lost file replaced by a fresh one, a
backup restored beside another deployment's keys) would otherwise look healthy
and answer every read with an integrity error. So the database records each
key's id and check value (``security.keys.KeyCheck``; never key material) the
first time a keyring is used with it, and every later start, and ``/readyz``,
compares the keyring against that record.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import cast

from sqlalchemy import Table, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from security.envelope import IntegrityError
from security.keys import KEK_PURPOSE, LOG_SIGNING_KEY_NAME, KeyProvider
from service.records.subject_keys import SubjectKeys
from service.store.database import Database
from service.store.tables import KeyCheck, Subject

KeyName = tuple[str, str]  # (purpose, key id)


class KeyringMismatch(Exception):
    """The keyring is not the one the database's data was written under; the message says how."""


# The key named first in a refusal: the KEK says most (it wraps every migrant's key).
_PURPOSE_ORDER = {KEK_PURPOSE: 0, "blind-index": 1, "token-hmac": 2, LOG_SIGNING_KEY_NAME: 3}


def _naming_order(name: KeyName) -> tuple[int, str, str]:
    return (_PURPOSE_ORDER.get(name[0], len(_PURPOSE_ORDER)), *name)


def describe_mismatch(recorded: dict[KeyName, str], held: dict[KeyName, str]) -> str | None:
    """What is wrong with the held keys, measured against the recorded ones, or None."""
    missing = sorted((name for name in recorded if name not in held), key=_naming_order)
    different = sorted(
        (name for name in recorded if name in held and held[name] != recorded[name]), key=_naming_order
    )
    if not missing and not different:
        return None
    first = (missing or different)[0]
    what = "does not hold" if missing else "holds a different key under the id of"
    count = len(missing) + len(different)
    others = f" (and {count - 1} other recorded keys)" if count > 1 else ""
    return (
        f"the keyring {what} the {first[0]} key {first[1]}{others} that this database's data was "
        "written under; restore the keyring this database was used with (a new keyring cannot "
        "read the existing data)"
    )


def held_checks(keys: KeyProvider) -> dict[KeyName, str]:
    return {(c.purpose, c.key_id): c.check_value for c in keys.key_checks()}


async def _recorded(session: AsyncSession) -> dict[KeyName, str]:
    rows = (await session.execute(select(KeyCheck))).scalars()
    return {(row.purpose, row.key_id): row.check_value for row in rows}


async def recorded_checks(database: Database) -> dict[KeyName, str]:
    async with database.reading() as session:
        return await _recorded(session)


async def _data_needs_other_keys(session: AsyncSession, keys: KeyProvider) -> bool:
    """For a database written before key checks were recorded: can this keyring read its data?"""
    sample = (
        await session.execute(
            select(Subject.id, Subject.wrapped_key, Subject.key_version)
            .where(Subject.wrapped_key.is_not(None))
            .limit(1)
        )
    ).first()
    if sample is None:
        return False
    try:
        SubjectKeys(keys).cipher(sample.id, sample.wrapped_key, sample.key_version)  # one probe, no request
    except IntegrityError:
        return True
    return False


async def check_and_record(database: Database, keys: KeyProvider) -> None:
    """Refuse a keyring that does not match the database's record; record keys new to it.

    Keys the keyring gained since the last start (a rotation) are recorded; keys
    it lost, or holds with other values, raise :class:`KeyringMismatch`. Safe to
    run from several processes starting at once: a concurrent record of the same
    key is kept, and compared like any other.
    """
    held = held_checks(keys)
    async with database.transaction() as session:
        recorded = await _recorded(session)
        problem = describe_mismatch(recorded, held)
        if problem is None and not recorded and await _data_needs_other_keys(session, keys):
            problem = (
                "the database holds data written under other keys (its subject keys do not unwrap "
                "under this keyring); restore the keyring this database was used with"
            )
        if problem is not None:
            raise KeyringMismatch(problem)
        new = [
            {"purpose": purpose, "key_id": key_id, "check_value": value, "recorded_at": datetime.now(UTC)}
            for (purpose, key_id), value in held.items()
            if (purpose, key_id) not in recorded
        ]
        if new:
            flavour = sqlite.insert if session.get_bind().dialect.name == "sqlite" else postgresql.insert
            table = cast(Table, KeyCheck.__table__)
            await session.execute(flavour(table).values(new).on_conflict_do_nothing())
            # Another process starting at the same time may have recorded a different keyring.
            problem = describe_mismatch(await _recorded(session), held)
            if problem is not None:
                raise KeyringMismatch(problem)

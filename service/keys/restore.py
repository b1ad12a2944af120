"""Restoring a data backup after a KEK epoch: it takes its subject keys from the live database.

A backup holds the subject keys as they were wrapped when it was taken. Once the KEK version
they were wrapped under is destroyed (``mhr keys retire``), those copies open nothing: that is
how an erasure reaches backups (SECURITY.md, KEK epochs). To bring a backup back, its rows are
given the subject keys the live database holds now (wrapped under a live KEK): every migrant
still in the live database becomes readable again, and a migrant erased there stays erased in
the restored copy, whatever the backup held for it. Only wrapped keys and KEK version numbers
move; nothing is unwrapped.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from security.keys import KEK_PURPOSE
from service.store.database import Database
from service.store.tables import KeyCheck, Subject

_BATCH = 500
# The entity an adoption's audit entry names: the restored copy's subject keys (no URL: it may
# carry the live database's credentials).
ADOPTED_ENTITY = ("Key", "subject-keys/adopted-from-live")


@dataclass(frozen=True)
class Adopted:
    subjects: int  # given the live database's subject key
    erased: int  # erased (or absent) in the live database: their key removed from the restored copy


async def adopt_live_subject_keys(
    restored: Database,
    live: Database,
    kek_id: str,
    min_decrypt: int,
    audit: Callable[[AsyncSession, str, tuple[str, str]], Awaitable[None]],
) -> Adopted:
    """Give every subject of ``restored`` the wrapped key ``live`` holds for it (none if erased there).

    Also drops the restored copy's record of KEK versions below ``min_decrypt`` (destroyed on
    purpose), so that the service starts on it with the current keys. The adoption is audited
    in the restored copy (the trail of the database the service will run on), in the
    transaction that completes it.
    """
    adopted = erased = 0
    after = ""
    while True:
        async with restored.reading() as session:
            ids = list(
                (
                    await session.execute(
                        select(Subject.id).where(Subject.id > after).order_by(Subject.id).limit(_BATCH)
                    )
                ).scalars()
            )
        if not ids:
            break
        async with live.reading() as session:
            current = {
                row.id: (row.wrapped_key, row.kek_version, row.erased_at)
                for row in await session.execute(
                    select(Subject.id, Subject.wrapped_key, Subject.kek_version, Subject.erased_at).where(
                        Subject.id.in_(ids)
                    )
                )
            }
        async with restored.transaction() as session:
            for subject_id in ids:
                wrapped, version, erased_at = current.get(subject_id, (None, None, None))
                await session.execute(
                    update(Subject)
                    .where(Subject.id == subject_id)
                    .values(wrapped_key=wrapped, kek_version=version, erased_at=erased_at)
                )
                if wrapped is None:
                    erased += 1
                else:
                    adopted += 1
        after = ids[-1]
    async with restored.transaction() as session:
        recorded = (
            await session.execute(select(KeyCheck.key_id).where(KeyCheck.purpose == KEK_PURPOSE))
        ).scalars()
        prefix = f"{kek_id}/v"
        retired = [
            kid
            for kid in recorded
            if kid.startswith(prefix)
            and kid[len(prefix) :].isdigit()
            and int(kid[len(prefix) :]) < min_decrypt
        ]
        if retired:
            await session.execute(
                delete(KeyCheck).where(KeyCheck.purpose == KEK_PURPOSE, KeyCheck.key_id.in_(retired))
            )
        await audit(session, "key-adopt", ADOPTED_ENTITY)
    return Adopted(adopted, erased)

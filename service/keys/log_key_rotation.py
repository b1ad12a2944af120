"""Audit checkpoint key rotation: a new log key signs every checkpoint after the latest one.

Under the integrator's lock (so no seal is half-way), the outgoing key is
recorded with the last checkpoint size it signed and the new key with the next
size; the provider then replaces its key, and the database's key check for the
log key is updated to the new one, all in one transaction. Processes still
holding the old key stop sealing (``service.audit.log_keys.check_signer_current``)
until they restart; their entries wait, durable, for the next seal.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import update

from security.keys import LOG_SIGNING_KEY_NAME, CheckpointSigning, KeyProvider
from security.signed_note import NoteSigner, NoteVerifier
from service.audit.log import take_seal_lock, tree_size
from service.audit.log_keys import LOG_KEY_PURPOSE, recorded_log_keys
from service.store.database import Database
from service.store.tables import KeyCheck, KeyRotation


@dataclass(frozen=True)
class LogKeyRotation:
    previous_vkey: str
    current_vkey: str
    first_size: int  # the smallest checkpoint size the new key signs


async def rotate_log_key(
    database: Database, keys: KeyProvider, name: str, *, now: datetime
) -> LogKeyRotation:
    async with database.transaction() as session:
        await take_seal_lock(session)
        size = await tree_size(session)
        rows = await recorded_log_keys(session)
        current_rows = [row for row in rows if row.last_size is None]
        if current_rows:
            outgoing = current_rows[0]
        else:
            # The first rotation: the key that signed every checkpoint so far.
            vkey = NoteSigner(name, CheckpointSigning(keys)).vkey()
            outgoing = KeyRotation(
                purpose=LOG_KEY_PURPOSE,
                key_id=NoteVerifier.from_vkey(vkey).key_id.hex(),
                active_from=now,
                vkey=vkey,
                first_size=0,
            )
            session.add(outgoing)
        outgoing.last_size = size
        outgoing.superseded_at = now
        public_key = keys.rotate_checkpoint_key()
        incoming = NoteVerifier(name, public_key)
        session.add(
            KeyRotation(
                purpose=LOG_KEY_PURPOSE,
                key_id=incoming.key_id.hex(),
                active_from=now,
                vkey=incoming.vkey(),
                first_size=size + 1,
            )
        )
        for check in keys.key_checks():
            if check.purpose == LOG_SIGNING_KEY_NAME:
                await session.execute(
                    update(KeyCheck)
                    .where(KeyCheck.purpose == check.purpose, KeyCheck.key_id == check.key_id)
                    .values(check_value=check.check_value, recorded_at=now)
                )
        previous_vkey = outgoing.vkey or ""
    return LogKeyRotation(previous_vkey, incoming.vkey(), size + 1)

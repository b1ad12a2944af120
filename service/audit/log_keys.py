"""The audit log's keys over time: which key may sign the checkpoints of which tree sizes.

Checkpoints name their key: the signature line of a C2SP signed note carries the
key name and its 4-byte key hash (``security.signed_note.key_id``). A rotation
(``service.keys.log_key_rotation``) records the outgoing key's verifier key with
the last checkpoint size it signed and the new key's with the first size it may
sign. ``/audit/keys`` publishes that list and ``mhr audit verify --keys`` checks
each checkpoint with the key whose hash it names, and only inside that key's range:
a key retired after a suspected compromise cannot sign new checkpoints unnoticed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from security.signed_note import NoteError, NoteVerifier
from service.store.tables import KeyRotation

LOG_KEY_PURPOSE = "audit-log"


class LogKeySuperseded(Exception):
    """This process signs with a log key that a rotation has replaced: it must reload its keys."""


@dataclass(frozen=True)
class LogKey:
    """One audit log key and the checkpoint sizes it may sign (``last_size`` None: still current)."""

    verifier: NoteVerifier
    first_size: int
    last_size: int | None

    @property
    def key_hash(self) -> str:
        return self.verifier.key_id.hex()

    def covers(self, size: int) -> bool:
        return self.first_size <= size and (self.last_size is None or size <= self.last_size)

    def as_json(self) -> dict[str, Any]:
        return {
            "vkey": self.verifier.vkey(),
            "key_hash": self.key_hash,
            "first_size": self.first_size,
            "last_size": self.last_size,
            "status": "current" if self.last_size is None else "previous",
        }


@dataclass(frozen=True)
class LogKeys:
    """The keys a verifier trusts, each for its range of checkpoint sizes."""

    keys: tuple[LogKey, ...]

    @classmethod
    def single(cls, verifier: NoteVerifier) -> LogKeys:
        """One key trusted for every size: a log never rotated, or a caller that gave one vkey."""
        return cls((LogKey(verifier, 0, None),))

    @classmethod
    def from_json(cls, text: str) -> LogKeys:
        """The list ``/audit/keys`` publishes (``{"keys": [...]}``); NoteError if malformed."""
        try:
            doc = json.loads(text)
            entries = doc["keys"]
            keys = tuple(
                LogKey(
                    NoteVerifier.from_vkey(str(e["vkey"])),
                    _size(e["first_size"]),
                    None if e.get("last_size") is None else _size(e["last_size"]),
                )
                for e in entries
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise NoteError(f"the log key list is malformed ({type(exc).__name__})") from None
        if not keys:
            raise NoteError("the log key list is empty")
        return cls(keys)

    @property
    def name(self) -> str:
        """The key name (the log's origin) of the current key."""
        return self.current.verifier.name

    @property
    def current(self) -> LogKey:
        return max(self.keys, key=lambda k: (k.last_size is None, k.first_size))

    def verify(self, note: str, size: int) -> str:
        """The note's text if the key it names signed it and may sign checkpoint ``size``.

        NoteError names the key hash when the note is signed by no listed key, or by a
        listed key outside its range.
        """
        named = signature_key_hashes(note)
        for key in self.keys:
            if key.key_hash in named:
                if not key.covers(size):
                    raise NoteError(
                        f"signed by log key {key.key_hash}, which may sign checkpoints "
                        f"{key.first_size}..{'' if key.last_size is None else key.last_size} only"
                    )
                return key.verifier.verify(note)
        unknown = ", ".join(sorted(named)) or "none"
        raise NoteError(f"signed by a log key not in the trusted list (key hash {unknown})")

    def as_json(self) -> dict[str, Any]:
        return {"keys": [k.as_json() for k in sorted(self.keys, key=lambda k: k.first_size)]}


def _size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("size")
    return value


def signature_key_hashes(note: str) -> set[str]:
    """The key hashes (hex) named by a note's signature lines; empty if it has none readable."""
    split = note.rfind("\n\n")
    found: set[str] = set()
    if split < 0:
        return found
    for line in note[split + 2 :].splitlines():
        try:
            _name, sig = NoteVerifier._parse_signature_line(line)
        except NoteError:
            continue
        found.add(sig[:4].hex())
    return found


async def recorded_log_keys(session: AsyncSession) -> Sequence[KeyRotation]:
    rows = await session.execute(
        select(KeyRotation).where(KeyRotation.purpose == LOG_KEY_PURPOSE).order_by(KeyRotation.first_size)
    )
    return rows.scalars().all()


async def log_keys(session: AsyncSession, current: NoteVerifier) -> LogKeys:
    """Every log key the database records, or the one current key when none was ever rotated."""
    rows = await recorded_log_keys(session)
    if not rows:
        return LogKeys.single(current)
    return LogKeys(
        tuple(
            LogKey(NoteVerifier.from_vkey(row.vkey or ""), int(row.first_size or 0), row.last_size)
            for row in rows
        )
    )


async def check_signer_current(session: AsyncSession, signer_key_hash: bytes) -> None:
    """Raise LogKeySuperseded when a rotation recorded another key as the current log key."""
    current = (
        await session.execute(
            select(KeyRotation.key_id).where(
                KeyRotation.purpose == LOG_KEY_PURPOSE, KeyRotation.last_size.is_(None)
            )
        )
    ).scalar_one_or_none()
    if current is not None and current != signer_key_hash.hex():
        raise LogKeySuperseded

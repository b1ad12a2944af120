"""One way to retry any write safely: a remembered request answers its retry as it did the first time.

Two keys name a request, both handled here the same way:

* an ``Idempotency-Key`` header, scoped to the client that sent it, remembered for
  ``idempotency_key_ttl_seconds`` (24 h by default);
* a transaction's ``Bundle.identifier`` (system and value: the exam's own id in the clinic's
  system), scoped to the submitting clinic and remembered for good: an exam is stored once.

The key is claimed in the write's own transaction before anything is written, so it commits
with the write or not at all; a concurrent request with the same key waits for that
transaction and then replays its answer. The same key with a different request is refused
(422 for a header, 409 for a Bundle.identifier naming another exam). What is remembered is
the status and the versions written (type, id, version): no resource content. A replay
re-reads those versions, encrypted as ever, so nothing clinical is stored twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson

from security.blind_index import BlindIndexer
from service.domain.errors import Conflict, DomainError, Invalid, Unprocessable
from service.records.idempotency_repository import IdempotencyRepository

MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class RequestKey:
    scope: str  # "client:<id>" or "organization:<id>"
    key_hash: bytes
    request_hash: bytes
    expires_at: datetime | None
    mismatch: type[DomainError]  # the refusal of a different request under the same key
    mismatch_diagnostics: str
    # The kid both hashes are under (the current index key), stored with the claim.
    index_key_id: str | None = None
    # (key hash, request hash) under the other index keys in use: while a rotation is under
    # way a request remembered under the previous key is still found, and answered, by them.
    earlier: tuple[tuple[bytes, bytes], ...] = ()


@dataclass(frozen=True)
class RememberedEntry:
    resource_type: str
    resource_id: str
    version_id: int
    subject_id: str
    status: str  # the entry's status line: "201 Created" or "200 OK"
    last_updated: str  # FHIR instant


@dataclass(frozen=True)
class Remembered:
    """What a write answered: its HTTP status and, per entry, the version it named."""

    status: int
    entries: tuple[RememberedEntry, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "entries": [
                [e.resource_type, e.resource_id, e.version_id, e.subject_id, e.status, e.last_updated]
                for e in self.entries
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Remembered:
        return cls(
            int(data["status"]),
            tuple(
                RememberedEntry(str(t), str(i), int(v), str(s), str(line), str(at))
                for t, i, v, s, line, at in data["entries"]
            ),
        )


def _request_hash(indexer: BlindIndexer, scope: str, canonical: bytes) -> bytes:
    # Keyed: a plain digest of a request body would let anyone holding the database test
    # guesses of its (clinical) content.
    return indexer.token("idempotent-request", scope, hashlib.sha256(canonical).hexdigest())


def canonical_json(document: Any) -> bytes:
    """The same JSON, whatever its key order and whitespace."""
    return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)


Indexers = BlindIndexer | Sequence[BlindIndexer]


def _indexers(indexer: Indexers) -> tuple[BlindIndexer, tuple[BlindIndexer, ...]]:
    """The current indexer and the others in use (a rotation's previous key)."""
    if isinstance(indexer, BlindIndexer):
        return indexer, ()
    first, *rest = indexer
    return first, tuple(rest)


def header_key(
    indexer: Indexers,
    client_id: str,
    raw_key: str,
    request: bytes,
    now: datetime,
    ttl_seconds: int,
) -> RequestKey:
    """The key of a request sent with ``Idempotency-Key``; ``request`` names the whole request
    (method, path, conditional headers, canonical body)."""
    key = raw_key.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':  # the header is a structured-field string
        key = key[1:-1]
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not all(" " <= ch <= "~" for ch in key):
        raise Invalid(
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters",
        )
    scope = f"client:{client_id}"
    current, others = _indexers(indexer)
    return RequestKey(
        scope,
        current.token("idempotency-key", scope, key),
        _request_hash(current, scope, request),
        now + timedelta(seconds=ttl_seconds),
        Unprocessable,
        "this Idempotency-Key was already used for a different request; use a new key for a new request",
        current.kid,
        tuple(
            (other.token("idempotency-key", scope, key), _request_hash(other, scope, request))
            for other in others
        ),
    )


def exam_key(indexer: Indexers, organization_id: str, bundle: dict[str, Any]) -> RequestKey | None:
    """The key of a transaction that carries ``Bundle.identifier`` with a system and a value."""
    identifier = bundle.get("identifier")
    if not isinstance(identifier, dict):
        return None
    system, value = identifier.get("system"), identifier.get("value")
    if not (isinstance(system, str) and isinstance(value, str) and system.strip() and value.strip()):
        return None
    scope = f"organization:{organization_id}"
    current, others = _indexers(indexer)
    named = f"{system.strip()}|{value.strip()}"
    canonical = canonical_json(bundle)
    return RequestKey(
        scope,
        current.token("bundle-identifier", scope, named),
        _request_hash(current, scope, canonical),
        None,
        Conflict,
        "this Bundle.identifier already names a different submission from this clinic; "
        "correct a stored exam with new versions (PUT), or give a new exam its own identifier",
        current.kid,
        tuple(
            (other.token("bundle-identifier", scope, named), _request_hash(other, scope, canonical))
            for other in others
        ),
    )


class Idempotency:
    def __init__(self, repo: IdempotencyRepository) -> None:
        self.repo = repo

    async def claim(self, key: RequestKey, now: datetime) -> Remembered | None:
        """None: this transaction now holds the key and goes on to write. Otherwise the answer
        to replay. A different request under the same key is refused."""
        await self.repo.forget_expired(key.scope, now)
        for key_hash, request_hash in key.earlier:
            # Remembered under the previous index key (before or early in a rotation): answered
            # from there; a pending row there is never another transaction's (see below).
            earlier = await self.repo.get(key.scope, key_hash)
            if earlier is not None and earlier.outcome is not None:
                if earlier.request_hash != request_hash:
                    raise key.mismatch(key.mismatch_diagnostics, code="conflict")
                return Remembered.from_json(earlier.outcome)
        if await self.repo.claim(
            key.scope, key.key_hash, key.request_hash, now, key.expires_at, key.index_key_id
        ):
            return None
        row = await self.repo.get(key.scope, key.key_hash)
        if row is None:  # expired and forgotten between the two statements: claim afresh
            if await self.repo.claim(
                key.scope, key.key_hash, key.request_hash, now, key.expires_at, key.index_key_id
            ):
                return None
            row = await self.repo.get(key.scope, key.key_hash)
            if row is None:
                raise Conflict("a request with this key is in progress; retry")
        if row.request_hash != key.request_hash:
            raise key.mismatch(key.mismatch_diagnostics, code="conflict")
        if row.outcome is None:
            # Pending rows are only ever visible to the transaction that claimed them (an
            # intake retried after losing a race for a migrant): it still holds the key.
            return None
        return Remembered.from_json(row.outcome)

    async def settle(self, key: RequestKey, remembered: Remembered) -> None:
        await self.repo.settle(key.scope, key.key_hash, remembered.to_json())

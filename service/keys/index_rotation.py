"""Blind-index key rotation: a new index key, every migrant moved to it online, the old one destroyed.

``mhr keys rotate-index`` makes a new index key in the provider (a new HMAC key object in a
PKCS#11 token) and records the rotation (``index_key_state``: current = new, previous = old).
From then on every lookup computes its tokens under both keys (service.records.index_keys), so
searches stay exact throughout; once every process has taken that up (``SETTLE_SECONDS``) new
migrants are indexed under the new key and ``keys.reindex`` jobs move the others, one migrant per
transaction: their search tokens, match keys, version label tokens and grants are re-derived
from the decrypted resources, and ``subjects.index_key_id`` names the new key. ``mhr keys
retire-index`` then destroys the old key, refused while a migrant is still under it.

There is no separate "switch": reads never pick one key, so nothing has to change for them when
the last migrant moves. What cannot be re-derived, for want of the raw value, is said plainly:

* remembered requests (``idempotent_requests``): the raw ``Idempotency-Key`` and
  ``Bundle.identifier`` are not stored. While both keys are held a retry is recognised under
  either. Header keys expire (``idempotency_key_ttl_seconds``): retiring waits until those under
  the old key have. Exam keys never expire: retiring forgets them only when told to
  (``--forget-exam-keys``), after which an exam first submitted before the rotation and sent
  again is stored again;
* audit entries name the hash of a requested id with the key id that made it
  (``hmac:<kid>:<hex>``); entries are never rewritten, so ``mhr audit verify`` is unaffected;
* search cursors are sealed under a key derived from the index key: one sealed under the old
  key opens until it is retired (400 after), except one that carries identifier indexes (400 at
  once: they are under the old key alone).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from security.blind_index import BlindIndexer
from security.keys import BLIND_INDEX_PURPOSE, KeyProvider, KeyringError
from service.core.metrics import INDEX_SUBJECTS
from service.domain.errors import IntegrityFailure
from service.records import index_keys as index_keys_module
from service.records.codec import open_version
from service.records.consents import refresh_grants
from service.records.context import RecordServices
from service.records.index_keys import STATE_ROW, IndexPhase, UnknownIndexKey, read_phase, settled
from service.records.indexing import identifiers_of, index_resource, labels_token
from service.records.repository import RecordRepository, version_row
from service.records.subject_keys import OpenedKeys
from service.store.database import Database
from service.store.tables import (
    IdempotentRequest,
    IndexKeyState,
    KeyCheck,
    MatchKey,
    ResourceVersion,
    SearchToken,
    StoredResource,
    Subject,
)

if TYPE_CHECKING:
    from service.runtime.providers import Runtime

log = logging.getLogger(__name__)

# Writes an admin action's audit entry in the action's transaction: (session, subtype, entity).
Audit = Callable[[AsyncSession, str, tuple[str, str]], Awaitable[None]]
NONE_LABEL = "unrecorded"


class IndexRotationRefused(Exception):
    """An index rotation step cannot be done now; the message says why (key ids only)."""


def _live() -> Any:
    # Erased migrants have no tokens left to move (erasure destroyed them): never counted.
    return Subject.wrapped_key.is_not(None)


def _not_under(kid: str) -> Any:
    return or_(Subject.index_key_id.is_(None), Subject.index_key_id != kid)


# --- status ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexStatus:
    phase: IndexPhase
    per_key: dict[str | None, int]
    held: tuple[str, ...]
    remembered_under_previous: int  # idempotent_requests rows under the previous key
    unexpired_header_keys_under_previous: int
    header_keys_expire_by: datetime | None

    @property
    def to_reindex(self) -> int:
        if not self.phase.rotating:
            return 0
        return sum(n for kid, n in self.per_key.items() if kid != self.phase.current)

    def as_json(self) -> dict[str, object]:
        phase = self.phase
        out: dict[str, object] = {
            "phase": "rotating" if phase.rotating else "single",
            "current_kid": phase.current,
            "previous_kid": phase.previous,
            "held_kids": list(self.held),
            "migrants_per_index_key": {
                (NONE_LABEL if kid is None else kid): n
                for kid, n in sorted(self.per_key.items(), key=lambda item: item[0] or "")
            },
            "to_reindex": self.to_reindex,
        }
        if phase.rotating:
            out["remembered_requests_under_previous"] = self.remembered_under_previous
            out["unexpired_idempotency_keys_under_previous"] = self.unexpired_header_keys_under_previous
            if self.header_keys_expire_by is not None:
                out["idempotency_keys_under_previous_expire_by"] = self.header_keys_expire_by.isoformat(
                    timespec="seconds"
                )
        return out


async def migrants_per_index_key(session: AsyncSession) -> dict[str | None, int]:
    rows = await session.execute(
        select(Subject.index_key_id, func.count()).where(_live()).group_by(Subject.index_key_id)
    )
    return {kid: int(n) for kid, n in rows.all()}


async def index_status(session: AsyncSession, keys: KeyProvider, now: datetime) -> IndexStatus:
    phase = await read_phase(session, keys)
    remembered = unexpired = 0
    expire_by = None
    if phase.previous is not None:
        under = IdempotentRequest.index_key_id == phase.previous
        remembered = int(
            (
                await session.execute(select(func.count()).select_from(IdempotentRequest).where(under))
            ).scalar_one()
        )
        row = (
            await session.execute(
                select(func.count(), func.max(IdempotentRequest.expires_at)).where(
                    under, IdempotentRequest.expires_at.is_not(None), IdempotentRequest.expires_at >= now
                )
            )
        ).one()
        unexpired, expire_by = int(row[0]), row[1]
        if expire_by is not None and expire_by.tzinfo is None:
            expire_by = expire_by.replace(tzinfo=UTC)
    return IndexStatus(
        phase,
        await migrants_per_index_key(session),
        keys.blind_index_kids(),
        remembered,
        unexpired,
        expire_by,
    )


_seen_labels: set[str] = set()


async def refresh_index_metric(session: AsyncSession) -> None:
    """Set ``mhr_index_migrants{index_key}``; a key that has emptied reads 0, not its last count."""
    found = {(NONE_LABEL if k is None else k): n for k, n in (await migrants_per_index_key(session)).items()}
    for label in _seen_labels - found.keys():
        INDEX_SUBJECTS.labels(label).set(0)
    for label, count in found.items():
        INDEX_SUBJECTS.labels(label).set(count)
    _seen_labels.update(found)


# --- rotate ---------------------------------------------------------------------------------


async def _write_state(session: AsyncSession, current: str, previous: str | None, now: datetime) -> None:
    row = await session.get(IndexKeyState, STATE_ROW, with_for_update=True)
    if row is None:
        session.add(IndexKeyState(id=STATE_ROW, current_kid=current, previous_kid=previous, changed_at=now))
    else:
        row.current_kid, row.previous_kid, row.changed_at = current, previous, now
    await session.flush()


async def rotate_index(database: Database, keys: KeyProvider, audit: Audit, *, now: datetime) -> IndexPhase:
    """Make a new index key and start moving every migrant to it; refused while one is under way."""
    async with database.transaction() as session:
        phase = await read_phase(session, keys)
        if phase.rotating:
            raise IndexRotationRefused(
                f"an index key rotation to {phase.current} is under way: finish it (`mhr keys reindex "
                "--wait`, then `mhr keys retire-index`) before starting another"
            )
        if phase.current not in keys.blind_index_kids():
            raise IndexRotationRefused(
                f"the index key in use, {phase.current}, is not held by this key provider"
            )
        # The key in use is recorded before the provider makes another current: if what follows
        # fails, every process still reads this one (the provider's "current" is never used).
        await _write_state(session, phase.current, None, now)
    previous = phase.current
    try:
        current = keys.rotate_secret(BLIND_INDEX_PURPOSE)
    except KeyringError as exc:
        raise IndexRotationRefused(str(exc)) from None
    async with database.transaction() as session:
        # Rows written before index keys were recorded are under the one key there was.
        await session.execute(
            update(Subject).where(Subject.index_key_id.is_(None)).values(index_key_id=previous)
        )
        await session.execute(
            update(IdempotentRequest)
            .where(IdempotentRequest.index_key_id.is_(None))
            .values(index_key_id=previous)
        )
        await _write_state(session, current, previous, now)
        await audit(session, "index-key-rotate", ("Key", f"{BLIND_INDEX_PURPOSE}/{current}"))
    return IndexPhase(current, previous, now)


# --- moving one migrant ---------------------------------------------------------------------


def _identifier_pairs(old: BlindIndexer, new: BlindIndexer, resource: dict[str, Any]) -> dict[bytes, bytes]:
    pairs = {}
    for system, value in identifiers_of(resource):
        try:
            pairs[old.identifier(system, value)] = new.identifier(system, value)
        except ValueError:
            continue  # normalises to nothing: it was never indexed
    return pairs


def _insert_ignoring(session: AsyncSession) -> Any:
    return sqlite.insert if session.get_bind().dialect.name == "sqlite" else postgresql.insert


async def reindex_subject(
    session: AsyncSession, services: RecordServices, subject_id: str, target: BlindIndexer, keys: OpenedKeys
) -> int:
    """Move one migrant's tokens to ``target``'s key; returns the versions read (0: nothing to do).

    Locks as a write does, current rows first and then the migrant's row (for update; writes take
    it shared), so a concurrent write lands wholly before or after the move.
    """
    await session.execute(
        select(StoredResource.id).where(StoredResource.subject_id == subject_id).with_for_update()
    )
    subject = (
        await session.execute(select(Subject).where(Subject.id == subject_id).with_for_update())
    ).scalar_one_or_none()
    if subject is None or subject.wrapped_key is None or subject.index_key_id == target.kid:
        return 0
    old = services.index_keys.for_kid(subject.index_key_id)
    repo = RecordRepository(session)
    currents = {
        (row.resource_type, row.id): row
        for row in (
            await session.execute(select(StoredResource).where(StoredResource.subject_id == subject_id))
        ).scalars()
    }
    versions = list(
        (
            await session.execute(
                select(ResourceVersion)
                .where(ResourceVersion.subject_id == subject_id)
                .order_by(ResourceVersion.resource_type, ResourceVersion.id, ResourceVersion.version_id)
            )
        ).scalars()
    )
    seen = 0
    for stored in versions:
        row = version_row(stored)
        resource: Any = orjson.loads(open_version(keys, subject, row))
        seen += 1
        await repo.set_labels_token(row, labels_token(target, services.labeler.apply(resource)))
        pointer = currents.get((row.resource_type, row.id))
        if pointer is None or pointer.version_id != row.version_id:
            continue
        # The current version's search tokens, replaced whole.
        await session.execute(
            delete(SearchToken).where(
                SearchToken.resource_type == row.resource_type, SearchToken.id == row.id
            )
        )
        tokens = [
            {"resource_type": row.resource_type, "id": row.id, "param": param, "value": value}
            for param, value in sorted(index_resource(target, resource).tokens)
        ]
        if tokens:
            await session.execute(insert(SearchToken), tokens)
        # Its ifNoneExist keys: each is the index of one of its identifiers.
        pairs = _identifier_pairs(old, target, resource)
        held = (
            await session.execute(
                select(MatchKey).where(
                    MatchKey.organization_id == pointer.organization_id,
                    MatchKey.resource_type == row.resource_type,
                    MatchKey.resource_id == row.id,
                    MatchKey.identifier_hash.in_(list(pairs)),
                )
            )
        ).scalars()
        moved = [(key.identifier_hash, pairs[bytes(key.identifier_hash)]) for key in held]
        for old_hash, new_hash in moved:
            await session.execute(
                delete(MatchKey).where(
                    MatchKey.organization_id == pointer.organization_id,
                    MatchKey.resource_type == row.resource_type,
                    MatchKey.identifier_hash == old_hash,
                )
            )
            # A claim already made under the new key (another resource since) keeps its holder.
            await session.execute(
                _insert_ignoring(session)(MatchKey)
                .values(
                    organization_id=pointer.organization_id,
                    resource_type=row.resource_type,
                    identifier_hash=new_hash,
                    resource_id=row.id,
                )
                .on_conflict_do_nothing()
            )
    await refresh_grants(services, repo, subject_id, {}, keys=keys, indexer=target)
    subject.index_key_id = target.kid
    await session.flush()
    return seen


@dataclass(frozen=True)
class ReindexOutcome:
    migrants: int
    versions: int
    last_subject_id: str | None  # None: nothing after the cursor


async def reindex_batch(
    session: AsyncSession, services: RecordServices, target_kid: str, *, after: str, limit: int
) -> ReindexOutcome:
    ids = list(
        (
            await session.execute(
                select(Subject.id)
                .where(Subject.id > after, _live(), _not_under(target_kid))
                .order_by(Subject.id)
                .limit(limit)
            )
        ).scalars()
    )
    if not ids:
        return ReindexOutcome(0, 0, None)
    target = services.index_keys.for_kid(target_kid)
    keys = services.keys.opened()
    versions = unreadable = 0
    try:
        for subject_id in ids:
            try:
                # One migrant's move is all or nothing: a version that fails its integrity check
                # undoes what was moved of that migrant, not the batch's other migrants.
                async with session.begin_nested():
                    versions += await reindex_subject(session, services, subject_id, target, keys)
            except IntegrityFailure:
                # Logged with its coordinates by open_version. The migrant stays under the previous
                # key, searchable as before (every lookup uses both keys), and counted as left to
                # move: `mhr keys status` shows it, and the previous key cannot be retired.
                unreadable += 1
    finally:
        keys.close()
    if unreadable:
        log.error(
            "index key rotation: migrants left under the previous key (stored data failed its "
            "integrity check)",
            extra={"event": "integrity", "migrants": unreadable},
        )
    return ReindexOutcome(len(ids), versions, ids[-1])


async def left_to_reindex(session: AsyncSession, target_kid: str) -> int:
    found = await session.execute(select(func.count()).where(_live(), _not_under(target_kid)))
    return int(found.scalar_one())


# --- retire ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Retired:
    kid: str
    forgotten_requests: int


async def retire_index(
    database: Database,
    keys: KeyProvider,
    audit: Audit,
    *,
    now: datetime,
    forget_exam_keys: bool = False,
) -> Retired:
    """Destroy the previous index key once no migrant and no unexpired request needs it."""
    async with database.transaction() as session:
        found = await index_status(session, keys, now)
        phase = found.phase
        if phase.previous is None:
            raise IndexRotationRefused(
                f"no index key rotation is under way (the key in use is {phase.current}): nothing to retire"
            )
        left = await left_to_reindex(session, phase.current)
        if left:
            raise IndexRotationRefused(
                f"{left} migrants are still indexed under {phase.previous}: "
                "run `mhr keys reindex --wait` first"
            )
        if found.unexpired_header_keys_under_previous:
            assert found.header_keys_expire_by is not None
            raise IndexRotationRefused(
                f"{found.unexpired_header_keys_under_previous} Idempotency-Key requests remembered under "
                f"{phase.previous} may still be retried until "
                f"{found.header_keys_expire_by.isoformat(timespec='seconds')}; retire after that"
            )
        under = IdempotentRequest.index_key_id == phase.previous
        exam_keys = int(
            (
                await session.execute(
                    select(func.count()).where(under, IdempotentRequest.expires_at.is_(None))
                )
            ).scalar_one()
        )
        if exam_keys and not forget_exam_keys:
            raise IndexRotationRefused(
                f"{exam_keys} exam submissions (Bundle.identifier) are remembered under {phase.previous} "
                "and cannot be re-keyed (the identifier is not stored); with --forget-exam-keys they are "
                "forgotten, and such an exam sent again is stored again"
            )
        forgotten = int(
            (await session.execute(delete(IdempotentRequest).where(under))).rowcount or 0  # type: ignore[attr-defined]
        )
        # Erased migrants have no tokens: they need no key, and name the one in use.
        await session.execute(
            update(Subject)
            .where(and_(Subject.wrapped_key.is_(None), _not_under(phase.current)))
            .values(index_key_id=phase.current)
        )
        await session.execute(
            delete(KeyCheck).where(KeyCheck.purpose == BLIND_INDEX_PURPOSE, KeyCheck.key_id == phase.previous)
        )
        await _write_state(session, phase.current, None, now)
        await audit(session, "index-key-retire", ("Key", f"{BLIND_INDEX_PURPOSE}/{phase.previous}"))
    # After the commit, and once every process has re-read the state and stopped computing under
    # the key: destroying it at once could fail a lookup still made under it (a stale token handle).
    await asyncio.sleep(index_keys_module.SETTLE_SECONDS)
    if phase.previous in keys.blind_index_kids():
        try:
            keys.retire_secret(BLIND_INDEX_PURPOSE, phase.previous)
        except KeyringError as exc:
            raise IndexRotationRefused(f"recorded as retired, but the key was not destroyed: {exc}") from None
    return Retired(phase.previous, forgotten)


async def wait_settled(runtime: Runtime) -> None:
    """Sleep until the rotation has settled (the jobs would wait as long)."""
    async with runtime.database.reading() as session:
        phase = await read_phase(session, runtime.keys)
    if phase.changed_at is not None:
        settle = timedelta(seconds=index_keys_module.SETTLE_SECONDS)
        delay = (phase.changed_at + settle - datetime.now(UTC)).total_seconds()
        if delay > 0:
            await asyncio.sleep(delay)


__all__ = [
    "IndexRotationRefused",
    "IndexStatus",
    "UnknownIndexKey",
    "index_status",
    "reindex_batch",
    "retire_index",
    "rotate_index",
    "settled",
]

"""The audit log's Merkle tree in the database: the integrator (`seal`), checkpoints and proofs.

Leaf order is append order. Entries get an autoincrement id when inserted, but
ids can commit out of order (transaction 7 may commit after transaction 8).
The integrator therefore never reasons about ids it cannot see: each run takes
every *committed* unsealed entry, in id order, and appends them. An entry whose
transaction commits late is simply appended by a later run, after entries with
higher ids. The leaf index is dense and final; the id is only a tiebreak. (The
alternative, waiting until no lower id can still be in flight, needs knowledge
of other transactions that neither database offers portably.)

One integrator at a time across replicas: on PostgreSQL a transaction-scoped
advisory lock, on SQLite the write lock every transaction takes (BEGIN
IMMEDIATE). Each run writes the new leaves' hashes, the perfect nodes they
complete, and one signed checkpoint, in one transaction: the tree size is the
largest checkpoint size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import (
    ColumnElement,
    ScalarSelect,
    Select,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute, Session

from security import merkle
from security.signed_note import Checkpoint, NoteSigner
from service.audit.events import Action, AuditAgent, AuditEntity, AuditRecord, EventType, Outcome
from service.audit.log_keys import LogKeySuperseded, check_signer_current
from service.audit.recorder import PendingEntry, insert_entries
from service.core.request_context import SOURCE
from service.store.database import Database
from service.store.tables import AuditCheckpoint, AuditEntry, AuditNode, AuditQuarantine, AuditRef

log = logging.getLogger(__name__)

# Any fixed 64-bit number, the same on every replica: "the audit integrator".
ADVISORY_LOCK_KEY = 0x6D68_7261_7564_6974  # "mhraudit"
SEAL_BATCH = 5000
SEAL_INTERVAL_SECONDS = 2.0


class SyncNodeReader(merkle.NodeReader):
    """Reads stored perfect nodes through a synchronous session (inside ``run_sync``)."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def get_nodes(self, keys: Sequence[merkle.NodeKey]) -> Mapping[merkle.NodeKey, bytes]:
        found: dict[merkle.NodeKey, bytes] = {}
        # Chunked: a proof needs ~2 log2(n) keys, a frontier log2(n); a few hundred per query at most.
        for start in range(0, len(keys), 200):
            chunk = list(keys[start : start + 200])
            rows = self._session.execute(
                select(AuditNode.level, AuditNode.node_index, AuditNode.hash).where(
                    tuple_(AuditNode.level, AuditNode.node_index).in_(chunk)
                )
            )
            for level, index, digest in rows:
                found[(level, index)] = bytes(digest)
        return found


@dataclass(frozen=True)
class StoredCheckpoint:
    size: int
    root_hash: bytes
    note: str
    created_at: datetime


async def latest_checkpoint(session: AsyncSession) -> StoredCheckpoint | None:
    row = (
        await session.execute(select(AuditCheckpoint).order_by(AuditCheckpoint.size.desc()).limit(1))
    ).scalar_one_or_none()
    if row is None:
        return None
    return StoredCheckpoint(row.size, bytes(row.root_hash), row.note, row.created_at)


async def checkpoint_at(session: AsyncSession, size: int) -> StoredCheckpoint | None:
    row = await session.get(AuditCheckpoint, size)
    if row is None:
        return None
    return StoredCheckpoint(row.size, bytes(row.root_hash), row.note, row.created_at)


async def checkpoints_page(session: AsyncSession, *, after: int, limit: int) -> list[StoredCheckpoint]:
    rows = (
        await session.execute(
            select(AuditCheckpoint)
            .where(AuditCheckpoint.size > after)
            .order_by(AuditCheckpoint.size)
            .limit(limit)
        )
    ).scalars()
    return [StoredCheckpoint(r.size, bytes(r.root_hash), r.note, r.created_at) for r in rows]


async def tree_size(session: AsyncSession) -> int:
    size = (await session.execute(select(func.max(AuditCheckpoint.size)))).scalar_one_or_none()
    return int(size or 0)


async def inclusion_proof(session: AsyncSession, index: int, size: int) -> list[bytes]:
    return await session.run_sync(lambda s: merkle.inclusion_proof(index, size, SyncNodeReader(s)))


async def consistency_proof(session: AsyncSession, old_size: int, new_size: int) -> list[bytes]:
    return await session.run_sync(lambda s: merkle.consistency_proof(old_size, new_size, SyncNodeReader(s)))


async def root_at(session: AsyncSession, size: int) -> bytes:
    return await session.run_sync(lambda s: merkle.root_at(size, SyncNodeReader(s)))


async def _take_lock(session: AsyncSession, *, wait: bool) -> bool:
    if session.get_bind().dialect.name != "postgresql":
        # SQLite: this transaction began IMMEDIATE, so it already holds the only write lock.
        await session.execute(text("SELECT 1"))
        return True
    if wait:
        await session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
        return True
    got = await session.execute(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
    return bool(got.scalar_one())


async def take_seal_lock(session: AsyncSession) -> None:
    """Wait for the integrator's lock in ``session``'s transaction (a key rotation needs no seal
    to be half-way)."""
    await _take_lock(session, wait=True)


async def seal(
    database: Database,
    signer: NoteSigner,
    origin: str,
    *,
    wait: bool = False,
    limit: int = SEAL_BATCH,
) -> Checkpoint | None:
    """Append up to ``limit`` committed unsealed entries and sign a checkpoint.

    Returns the new checkpoint, or None when there was nothing to seal or
    (``wait=False``) another integrator holds the lock.
    """
    checkpoint, _full = await _seal(database, signer, origin, wait=wait, limit=limit)
    return checkpoint


async def _seal(
    database: Database, signer: NoteSigner, origin: str, *, wait: bool, limit: int
) -> tuple[Checkpoint | None, bool]:
    async with database.transaction() as session:
        if not await _take_lock(session, wait=wait):
            return None, False
        # A process still holding a rotated-out log key must not sign: its checkpoints would
        # fall outside that key's range and fail verification.
        await check_signer_current(session, signer.key_id)
        size = await tree_size(session)
        await _quarantine_past_tree(session, size)
        pending = (
            await session.execute(
                select(AuditEntry.id, AuditEntry.content)
                .where(AuditEntry.leaf_index.is_(None))
                .order_by(AuditEntry.id)
                .limit(limit)
            )
        ).all()
        if not pending:
            return None, False
        frontier = await session.run_sync(lambda s: merkle.CompactRange.from_reader(size, SyncNodeReader(s)))
        leaves: list[dict[str, object]] = []
        nodes: list[dict[str, object]] = []
        for entry_id, content in pending:
            digest = merkle.leaf_hash(bytes(content))
            leaves.append({"id": entry_id, "leaf_index": frontier.size, "leaf_hash": digest})
            nodes.extend(
                {"level": level, "node_index": index, "hash": node}
                for level, index, node in frontier.append(digest)
            )
        await session.execute(update(AuditEntry), leaves)
        await session.execute(insert(AuditNode), nodes)
        checkpoint = Checkpoint(origin, frontier.size, frontier.root())
        await session.execute(
            insert(AuditCheckpoint).values(
                size=checkpoint.size,
                root_hash=checkpoint.root_hash,
                note=signer.sign(checkpoint.body()),
                created_at=datetime.now(UTC),
            )
        )
    return checkpoint, len(pending) == limit


def _node_past(size: int) -> ColumnElement[bool]:
    """A stored node covering a leaf at or past ``size``: node (l, i) covers leaves i*2^l..(i+1)*2^l-1,
    so it does exactly when i >= size >> l; a level above size's bit length, or below 0, or an
    index below 0, holds no genuine node. (No shift in SQL: it would overflow on a forged row.)"""
    top = size.bit_length()
    return or_(
        AuditNode.level > top,
        AuditNode.level < 0,
        *(
            (AuditNode.level == level)
            & ((AuditNode.node_index >= size >> level) | (AuditNode.node_index < 0))
            for level in range(top + 1)
        ),
    )


def _edge(column: InstrumentedAttribute[int], *, last: bool, level: int | None = None) -> ScalarSelect[int]:
    """The first or last value of ``column`` (within one level): one probe of the primary key."""
    probe = select(column).order_by(column.desc() if last else column).limit(1)
    if level is not None:
        probe = probe.where(AuditNode.level == level)
    return probe.scalar_subquery()


def _any_node_past(size: int) -> Select[tuple[bool]]:
    """Whether any stored node is ``_node_past`` ``size``, asked of the edges of the primary key
    (level, node_index): the highest and lowest level, and each level's highest and lowest index.
    Counting ``_node_past`` at every seal scanned every node, and grew with the log (90 ms a
    seal at 1.1M nodes); this costs two index probes a level."""
    top = size.bit_length()
    checks: list[ColumnElement[bool]] = [
        func.coalesce(_edge(AuditNode.level, last=True), 0) > top,
        func.coalesce(_edge(AuditNode.level, last=False), 0) < 0,
    ]
    for level in range(top + 1):
        checks.append(func.coalesce(_edge(AuditNode.node_index, last=True, level=level), -1) >= size >> level)
        checks.append(func.coalesce(_edge(AuditNode.node_index, last=False, level=level), 0) < 0)
    return select(or_(*checks))


async def _quarantine_past_tree(session: AsyncSession, size: int) -> None:
    """Move aside what claims a place at or past the signed tree size; no sealed row can.

    The integrator writes leaf indexes, nodes and their checkpoint in one transaction,
    so an entry with ``leaf_index >= size`` or a node reaching past ``size`` was put
    there by someone else. Left in place it would collide with the next genuine leaf
    (a unique violation on every run: sealing blocked for good). It is not sealed
    either, which would launder it into the log: the entry goes to
    ``audit_quarantine`` with its bytes, the node is dropped (it is derived data),
    and a security-alert entry saying so is appended in this same run, so the
    incident is itself on the signed record. `mhr audit verify` reports every
    quarantined row until an operator has investigated and removed it.
    """
    intruders = (
        await session.execute(
            select(AuditEntry.id, AuditEntry.leaf_index, AuditEntry.leaf_hash, AuditEntry.content)
            .where((AuditEntry.leaf_index >= size) | (AuditEntry.leaf_index < 0))
            .order_by(AuditEntry.leaf_index)
        )
    ).all()
    stray_nodes = 0
    if (await session.execute(_any_node_past(size))).scalar_one():
        stray_nodes = (await session.execute(select(func.count()).where(_node_past(size)))).scalar_one()
    if not intruders and not stray_nodes:
        return
    now = datetime.now(UTC)
    ids = [int(row[0]) for row in intruders]
    if ids:
        await session.execute(
            insert(AuditQuarantine),
            [
                {
                    "entry_id": entry_id,
                    "leaf_index": leaf_index,
                    "leaf_hash": None if leaf_hash is None else bytes(leaf_hash),
                    "content": bytes(content),
                    "tree_size": size,
                    "found_at": now,
                }
                for entry_id, leaf_index, leaf_hash, content in intruders
            ],
        )
        await session.execute(delete(AuditRef).where(AuditRef.entry_id.in_(ids)))
        await session.execute(delete(AuditEntry).where(AuditEntry.id.in_(ids)))
    if stray_nodes:
        await session.execute(delete(AuditNode).where(_node_past(size)))
    log.critical(
        "audit log integrity: rows past the signed tree size were quarantined",
        extra={"tree_size": size, "entries": len(ids), "nodes": int(stray_nodes)},
    )
    detail = (
        f"{len(ids)} entries and {int(stray_nodes)} tree nodes claimed places "
        f"past the signed tree size {size}"
    )
    await insert_entries(
        session,
        [
            PendingEntry(
                AuditRecord(
                    event_type=EventType.admin,
                    subtype="integrity-quarantine",
                    action=Action.execute,
                    outcome=Outcome.serious_failure,
                    agent=AuditAgent(None, None, "integrator"),
                    entities=tuple(AuditEntity("AuditEvent", str(entry_id)) for entry_id in ids[:100]),
                    detail=detail,
                ),
                f"integrator-{now.strftime('%Y%m%dT%H%M%S%f')}",
                SOURCE,
            )
        ],
    )


async def seal_all(database: Database, signer: NoteSigner, origin: str, *, wait: bool = True) -> int:
    """Seal until nothing is left; returns the final tree size (0 if never sealed)."""
    while True:
        _checkpoint, full = await _seal(database, signer, origin, wait=wait, limit=SEAL_BATCH)
        if not full:
            async with database.sessions() as session:
                return await tree_size(session)


async def run_integrator(
    database: Database,
    signer: NoteSigner,
    origin: str,
    *,
    interval: float = SEAL_INTERVAL_SECONDS,
) -> None:
    """The in-process background integrator: seal every ``interval`` seconds while there is new data.

    Every replica runs one; the lock makes all but one of them no-ops at a time.
    Errors are logged and retried next round (entries are durable meanwhile).
    """
    while True:
        try:
            checkpoint, full = await _seal(database, signer, origin, wait=False, limit=SEAL_BATCH)
            if checkpoint is not None:
                log.debug("audit log sealed", extra={"tree_size": checkpoint.size})
            if full:
                continue  # a backlog: go again at once
        except asyncio.CancelledError:
            raise
        except LogKeySuperseded:
            log.critical(
                "audit log key rotated: this process holds the previous key and does not seal; "
                "restart it to load the current key"
            )
        except merkle.MissingNodeError:
            # The latest checkpoint names a tree its stored nodes cannot rebuild: a checkpoint
            # row or nodes were forged or removed. Nothing can be appended to it safely.
            log.critical(
                "audit log integrity: the tree at the latest checkpoint cannot be rebuilt from its "
                "stored nodes; sealing is stopped: run `mhr audit verify`",
            )
        except Exception as exc:
            log.error("audit integrator failed; retrying", extra={"error_type": type(exc).__name__})
        await asyncio.sleep(interval)


def start_integrator(database: Database, signer: NoteSigner) -> asyncio.Task[None]:
    """Start the background integrator for this process (called by the process's background work).

    It takes the database and the log signer, not the Runtime: audit/ sits below the composition
    root that builds the Runtime, and must not import it."""
    return asyncio.create_task(run_integrator(database, signer, signer.name), name="mhr-audit-integrator")


async def stop_integrator(task: asyncio.Task[None]) -> None:
    """Cancel the integrator and wait for it, so that no seal is cut off mid-transaction by disposal."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

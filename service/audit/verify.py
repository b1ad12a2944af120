"""`mhr audit verify`: check the audit log end to end and name the first thing that fails.

Works from a database URL (offline, e.g. against a restored backup, without
the service running) or from a running service's auditor API. Trust comes
from outside the log: the log's public key (vkey) and/or a checkpoint the
auditor kept from an earlier run.

Checks, in log order:
- every stored checkpoint is signed by the log key, names the expected origin,
  and its root equals the root recomputed from the entries at its size;
- leaf indexes are dense (0..n-1), each entry's content hashes to the leaf
  hash and level-0 node stored for it (database only);
- the trusted checkpoint's root equals the recomputed root at its size, and
  the service's consistency proof from it to the latest checkpoint verifies;
- every stored tree node equals the recomputed one (database only), since
  proofs are served from those nodes.

A forged entry inserted *unsealed* (as if a request had written it) cannot be
told from a real one by any log: the log proves that nothing sealed changed.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from sqlalchemy import and_, func, select

from security import merkle
from security.signed_note import Checkpoint, NoteError, NoteVerifier
from service.audit import log as audit_log
from service.store.database import Database
from service.store.tables import AuditCheckpoint, AuditEntry, AuditNode

BATCH = 1000


@dataclass(frozen=True)
class Leaf:
    index: int
    entry_id: int
    content: bytes
    stored_leaf_hash: bytes | None = None
    stored_node: bytes | None = None


class LogSource(Protocol):
    has_stored_hashes: bool

    async def checkpoints(self) -> list[tuple[int, str]]: ...

    def leaves(self, end: int) -> AsyncIterator[Leaf]: ...

    async def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]: ...

    def nodes(self) -> AsyncIterator[tuple[int, int, bytes]]: ...

    async def unsealed(self) -> int | None: ...


@dataclass(order=True)
class Failure:
    position: tuple[int, int]  # (leaf index, 0 entry | 1 checkpoint | 2 trusted | 3 node): log order
    subject: str = field(compare=False)
    reason: str = field(compare=False)

    def __str__(self) -> str:
        return f"{self.subject}: {self.reason}"


@dataclass
class Report:
    failures: list[Failure] = field(default_factory=list)
    leaves: int = 0
    checkpoints: int = 0
    tree_size: int = 0
    unsealed: int | None = None
    trusted_size: int | None = None

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def first(self) -> Failure | None:
        return min(self.failures) if self.failures else None

    def summary(self) -> str:
        trusted = (
            "" if self.trusted_size is None else f", consistent with trusted checkpoint {self.trusted_size}"
        )
        unsealed = "" if self.unsealed is None else f", {self.unsealed} entries awaiting sealing"
        if self.ok:
            return (
                f"OK: {self.leaves} entries, {self.checkpoints} checkpoints verified, "
                f"tree size {self.tree_size}{trusted}{unsealed}"
            )
        return f"FAILED: {self.first} ({len(self.failures)} problems in all)"


def _note_text(note: str) -> str:
    split = note.rfind("\n\n")
    if split < 0:
        raise NoteError("note has no blank line before its signatures")
    return note[: split + 1]


def _open_checkpoint(note: str, verifier: NoteVerifier | None) -> Checkpoint:
    text = verifier.verify(note) if verifier is not None else _note_text(note)
    return Checkpoint.parse(text)


async def verify_log(
    source: LogSource,
    *,
    verifier: NoteVerifier | None,
    trusted_note: str | None = None,
    origin: str | None = None,
) -> Report:
    if verifier is None and trusted_note is None:
        raise ValueError("verification needs the log's public key or a trusted checkpoint")
    report = Report()
    fail = report.failures.append

    trusted: Checkpoint | None = None
    if trusted_note is not None:
        try:
            trusted = _open_checkpoint(trusted_note, verifier)
        except NoteError as exc:
            fail(Failure((-1, 2), "trusted checkpoint", f"does not verify ({exc})"))
            return report
        report.trusted_size = trusted.size
    expected_origin = origin or (trusted.origin if trusted else None) or (verifier.name if verifier else None)
    if trusted is not None and trusted.origin != expected_origin:
        fail(Failure((-1, 2), "trusted checkpoint", f"origin {trusted.origin!r} is not {expected_origin!r}"))

    roots: dict[int, bytes] = {}
    stored = await source.checkpoints()
    for size, note in stored:
        report.checkpoints += 1
        where = (size - 1, 1)
        try:
            checkpoint = _open_checkpoint(note, verifier)
        except NoteError as exc:
            fail(Failure(where, f"checkpoint {size}", f"signature or format invalid ({exc})"))
            continue
        if checkpoint.origin != expected_origin:
            fail(
                Failure(
                    where, f"checkpoint {size}", f"origin {checkpoint.origin!r} is not {expected_origin!r}"
                )
            )
        if checkpoint.size != size:
            fail(Failure(where, f"checkpoint {size}", f"its signed body says size {checkpoint.size}"))
            continue
        roots[size] = checkpoint.root_hash
    latest = max(roots, default=0)
    report.tree_size = latest
    end = max(latest, trusted.size if trusted else 0, max((s for s, _ in stored), default=0))

    # Recompute the tree from the entries themselves.
    frontier = merkle.CompactRange()
    recomputed = merkle.MemoryNodes() if source.has_stored_hashes else None
    expected = 0
    gap = False
    async for leaf in source.leaves(end):
        if leaf.index != expected:
            fail(
                Failure(
                    (expected, 0),
                    f"leaf {expected}",
                    f"missing: the next sealed entry (id {leaf.entry_id}) has leaf index {leaf.index}; "
                    "the sequence is not dense",
                )
            )
            gap = True
            break
        digest = merkle.leaf_hash(leaf.content)
        subject = f"entry {leaf.entry_id} (leaf {leaf.index})"
        if source.has_stored_hashes:
            if leaf.stored_leaf_hash is not None and leaf.stored_leaf_hash != digest:
                fail(Failure((leaf.index, 0), subject, "content does not match its sealed leaf hash"))
            elif leaf.stored_node is None:
                fail(Failure((leaf.index, 0), subject, "no stored tree node for this leaf"))
            elif leaf.stored_node != digest:
                fail(Failure((leaf.index, 0), subject, "content does not match the tree's leaf node"))
        created = frontier.append(digest)
        if recomputed is not None:
            recomputed.add(created)
        expected += 1
        report.leaves += 1
        size = expected
        if size in roots and roots[size] != frontier.root():
            fail(
                Failure(
                    (size - 1, 1),
                    f"checkpoint {size}",
                    "signed root does not match the root recomputed from the entries",
                )
            )
        if trusted is not None and trusted.size == size and trusted.root_hash != frontier.root():
            fail(
                Failure(
                    (size - 1, 2),
                    f"trusted checkpoint {size}",
                    "the log's entries no longer produce this root: the log was rewritten",
                )
            )
    for size in sorted(roots):
        if size > expected:
            why = "a leaf before it is missing" if gap else f"the log has only {expected} sealed entries"
            fail(Failure((size - 1, 1), f"checkpoint {size}", f"cannot be recomputed: {why}"))
    if trusted is not None and trusted.size > expected:
        fail(
            Failure(
                (trusted.size - 1, 2),
                f"trusted checkpoint {trusted.size}",
                f"the log has only {expected} sealed entries: entries were removed",
            )
        )
    if trusted is not None and trusted.size == 0 and trusted.root_hash != merkle.EMPTY_ROOT:
        fail(Failure((-1, 2), "trusted checkpoint 0", "an empty tree has the empty root"))

    # The service proves consistency from its stored nodes: check what it would hand out.
    if trusted is not None and 0 < trusted.size < latest and latest in roots:
        try:
            proof = await source.consistency_proof(trusted.size, latest)
            merkle.verify_consistency(trusted.size, latest, proof, trusted.root_hash, roots[latest])
        except (merkle.ProofError, merkle.MissingNodeError, ValueError) as exc:
            fail(
                Failure(
                    (latest - 1, 2),
                    f"consistency {trusted.size} -> {latest}",
                    f"proof from the trusted checkpoint does not verify ({exc})",
                )
            )

    if recomputed is not None:
        async for level, index, digest in source.nodes():
            if (index + 1) << level > expected:
                continue  # beyond what was recomputed; reported above if it matters
            mine = recomputed.get_nodes([(level, index)]).get((level, index))
            if mine != digest:
                first_leaf = index << level
                fail(
                    Failure(
                        (first_leaf + (1 << level) - 1, 3),
                        f"tree node {level}/{index}",
                        f"stored hash differs from the one recomputed from leaves {first_leaf}.."
                        f"{first_leaf + (1 << level) - 1}: one of them was altered (proofs would be wrong)",
                    )
                )
    report.unsealed = await source.unsealed()
    return report


# --- sources -----------------------------------------------------------------


class DatabaseSource:
    """Reads the log tables directly, in short read transactions (safe against a live service)."""

    has_stored_hashes = True

    def __init__(self, database: Database) -> None:
        self.database = database

    async def checkpoints(self) -> list[tuple[int, str]]:
        async with self.database.sessions() as session:
            rows = await session.execute(
                select(AuditCheckpoint.size, AuditCheckpoint.note).order_by(AuditCheckpoint.size)
            )
            return [(int(size), note) for size, note in rows]

    async def leaves(self, end: int) -> AsyncIterator[Leaf]:
        cursor = 0
        while cursor < end:
            async with self.database.sessions() as session:
                rows = (
                    await session.execute(
                        select(
                            AuditEntry.leaf_index,
                            AuditEntry.id,
                            AuditEntry.content,
                            AuditEntry.leaf_hash,
                            AuditNode.hash,
                        )
                        .outerjoin(
                            AuditNode,
                            and_(AuditNode.level == 0, AuditNode.node_index == AuditEntry.leaf_index),
                        )
                        .where(AuditEntry.leaf_index >= cursor, AuditEntry.leaf_index < end)
                        .order_by(AuditEntry.leaf_index)
                        .limit(BATCH)
                    )
                ).all()
            for index, entry_id, content, leaf_hash, node in rows:
                yield Leaf(
                    int(index or 0),
                    int(entry_id),
                    bytes(content),
                    None if leaf_hash is None else bytes(leaf_hash),
                    None if node is None else bytes(node),
                )
            if len(rows) < BATCH:
                return
            cursor = int(rows[-1][0] or 0) + 1

    async def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        async with self.database.sessions() as session:
            return await audit_log.consistency_proof(session, old_size, new_size)

    async def nodes(self) -> AsyncIterator[tuple[int, int, bytes]]:
        level, index = -1, -1
        while True:
            async with self.database.sessions() as session:
                rows = (
                    await session.execute(
                        select(AuditNode.level, AuditNode.node_index, AuditNode.hash)
                        .where(
                            (AuditNode.level > level)
                            | and_(AuditNode.level == level, AuditNode.node_index > index)
                        )
                        .order_by(AuditNode.level, AuditNode.node_index)
                        .limit(BATCH * 4)
                    )
                ).all()
            for row_level, row_index, digest in rows:
                yield int(row_level), int(row_index), bytes(digest)
            if len(rows) < BATCH * 4:
                return
            level, index = int(rows[-1][0]), int(rows[-1][1])

    async def unsealed(self) -> int | None:
        async with self.database.sessions() as session:
            count = await session.execute(select(func.count()).where(AuditEntry.leaf_index.is_(None)))
            return int(count.scalar_one())


class HttpSource:
    """Reads the log through the auditor API of a running service."""

    has_stored_hashes = False

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def _json(self, path: str, params: dict[str, Any]) -> Any:
        response = await self.client.get(path, params=params)
        response.raise_for_status()
        return response.json()

    async def checkpoints(self) -> list[tuple[int, str]]:
        found: list[tuple[int, str]] = []
        after = 0
        while True:
            page = await self._json("/audit/checkpoints", {"after": after, "_count": BATCH})
            found.extend((int(c["size"]), str(c["note"])) for c in page["checkpoints"])
            if len(page["checkpoints"]) < BATCH:
                return found
            after = found[-1][0]

    async def leaves(self, end: int) -> AsyncIterator[Leaf]:
        cursor = 0
        while cursor < end:
            page = await self._json("/audit/leaves", {"start": cursor, "end": min(end, cursor + BATCH)})
            rows = page["leaves"]
            for row in rows:
                yield Leaf(int(row["index"]), int(row["entry"]), base64.b64decode(row["content"]))
            if not rows:
                return
            cursor = int(rows[-1]["index"]) + 1

    async def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        page = await self._json("/audit/proof/consistency", {"from": old_size, "to": new_size})
        return [base64.b64decode(h) for h in page["proof"]]

    async def nodes(self) -> AsyncIterator[tuple[int, int, bytes]]:
        return
        yield  # pragma: no cover - an empty async generator

    async def unsealed(self) -> int | None:
        return None


async def verify_database(
    database_url: str, *, verifier: NoteVerifier | None, trusted_note: str | None, origin: str | None = None
) -> Report:
    database = Database(database_url)
    try:
        return await verify_log(
            DatabaseSource(database), verifier=verifier, trusted_note=trusted_note, origin=origin
        )
    finally:
        await database.dispose()


async def verify_service(
    base_url: str,
    token: str,
    *,
    verifier: NoteVerifier | None,
    trusted_note: str | None,
    origin: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Report:
    async with httpx.AsyncClient(
        base_url=base_url.rstrip("/"),
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
        transport=transport,
    ) as client:
        return await verify_log(
            HttpSource(client), verifier=verifier, trusted_note=trusted_note, origin=origin
        )

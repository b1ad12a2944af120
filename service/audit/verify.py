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
  proofs are served from those nodes;
- every entry's search and accounting columns and its `audit_refs` (what
  AuditEvent search and the migrant's disclosure report select by) are the
  ones derived from its content, sealed or not (database only);
- no entry or node claims a place at or past the signed tree size, and nothing
  sits in the integrator's quarantine (database only).

The log's public key is required: a checkpoint whose signature was not checked
proves nothing. Truncation (entries removed from the end, or a wiped log)
cannot be told from a young log except against a checkpoint retained outside
the database (`mhr audit checkpoint --out FILE`); the report says so when
none was given.

A forged entry inserted *unsealed* (as if a request had written it) cannot be
told from a real one by any log: the log proves that nothing sealed changed.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx
import orjson
from sqlalchemy import Row, and_, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from security import merkle
from security.signed_note import Checkpoint, NoteError, NoteVerifier
from service.audit import log as audit_log
from service.audit.log_keys import LogKeys
from service.audit.recorder import derived_columns, derived_refs
from service.store.database import Database
from service.store.tables import AuditCheckpoint, AuditEntry, AuditNode, AuditQuarantine, AuditRef

BATCH = 1000
_UNSEALED = 1 << 62  # failure position of unsealed and quarantined entries: after every leaf


@dataclass(frozen=True)
class Leaf:
    index: int
    entry_id: int
    content: bytes
    stored_leaf_hash: bytes | None = None
    stored_node: bytes | None = None
    # The search and accounting columns and audit_refs stored for it (database only).
    columns: Mapping[str, Any] | None = None
    refs: frozenset[tuple[str, str]] | None = None


@dataclass(frozen=True)
class Intruder:
    """A row in the audit tables that no integrator run wrote (or one the integrator moved aside)."""

    entry_id: int
    leaf_index: int | None
    quarantined: bool = False


class LogSource(Protocol):
    has_stored_hashes: bool

    async def checkpoints(self) -> list[tuple[int, str]]: ...

    def leaves(self, end: int) -> AsyncIterator[Leaf]: ...

    async def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]: ...

    def nodes(self) -> AsyncIterator[tuple[int, int, bytes]]: ...

    async def unsealed(self) -> int | None: ...

    def unsealed_entries(self) -> AsyncIterator[Leaf]: ...

    async def intruders(self, tree_size: int) -> list[Intruder]: ...


@dataclass(order=True)
class Failure:
    # (leaf index, 0 entry | 1 checkpoint | 2 trusted | 3 node): log order; unsealed entries last.
    position: tuple[int, int]
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
    columns_checked: bool = False

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

    def not_checked(self) -> list[str]:
        """What this run could not check, said plainly (printed with the summary)."""
        gaps = []
        if self.trusted_size is None:
            gaps.append(
                "no retained checkpoint was given: entries removed from the end of the log, or the "
                "whole log, cannot be detected (keep one with `mhr audit checkpoint --out FILE` "
                "and pass it with --checkpoint FILE)"
            )
        if not self.columns_checked:
            gaps.append(
                "the search columns and audit_refs (what AuditEvent search and the disclosure "
                "report select by) were not checked: that needs --database-url"
            )
        return gaps


def _open_checkpoint(note: str, keys: LogKeys, size: int | None = None) -> Checkpoint:
    """The checkpoint, verified by the key its note names, which must be trusted for its size.

    ``size`` is the tree size the checkpoint is stored under; a retained checkpoint has none, so
    the size its body claims is the one its key must cover (the body is then verified as well).
    """
    if size is None:
        split = note.rfind("\n\n")
        if split < 0:
            raise NoteError("note has no blank line before its signatures")
        size = Checkpoint.parse(note[: split + 1]).size
    return Checkpoint.parse(keys.verify(note, size))


def _derived_mismatch(leaf: Leaf) -> str | None:
    """How the stored columns or refs of ``leaf`` disagree with its content, or None."""
    if leaf.columns is None or leaf.refs is None:
        return None
    try:
        content = orjson.loads(leaf.content)
        columns = derived_columns(content)
        refs = derived_refs(content)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return "content is not an audit entry (its columns cannot be derived from it)"
    for name, value in columns.items():
        stored = leaf.columns.get(name)
        if name == "recorded_at" and stored is not None and stored.tzinfo is None:
            stored = stored.replace(tzinfo=UTC)
        if stored != value:
            shown = value.isoformat() if isinstance(value, datetime) else value
            was = stored.isoformat() if isinstance(stored, datetime) else stored
            return f"column {name} is {was!r} but the content says {shown!r}"
    if leaf.refs != refs:
        missing = sorted(refs - leaf.refs)
        extra = sorted(leaf.refs - refs)
        said = []
        if missing:
            said.append("missing " + ", ".join(f"{k}={v}" for k, v in missing[:3]))
        if extra:
            said.append("not in the content " + ", ".join(f"{k}={v}" for k, v in extra[:3]))
        return "audit_refs disagree with the content: " + "; ".join(said)
    return None


async def verify_log(
    source: LogSource,
    *,
    verifier: NoteVerifier | LogKeys,
    trusted_note: str | None = None,
    origin: str | None = None,
) -> Report:
    """Verify the log against the log's public key (``verifier``), or its keys over time
    (``LogKeys``, from ``/audit/keys``: each checkpoint by the key it names, inside that key's
    range of sizes), and when given a retained checkpoint. Without a key no checkpoint
    signature can be checked: there is no such mode."""
    keys = verifier if isinstance(verifier, LogKeys) else LogKeys.single(verifier)
    report = Report(columns_checked=source.has_stored_hashes)
    fail = report.failures.append

    trusted: Checkpoint | None = None
    if trusted_note is not None:
        try:
            trusted = _open_checkpoint(trusted_note, keys)
        except NoteError as exc:
            fail(Failure((-1, 2), "trusted checkpoint", f"does not verify ({exc})"))
            return report
        report.trusted_size = trusted.size
    expected_origin = origin or (trusted.origin if trusted else None) or keys.name
    if trusted is not None and trusted.origin != expected_origin:
        fail(Failure((-1, 2), "trusted checkpoint", f"origin {trusted.origin!r} is not {expected_origin!r}"))

    roots: dict[int, bytes] = {}
    stored = await source.checkpoints()
    for size, note in stored:
        report.checkpoints += 1
        where = (size - 1, 1)
        try:
            checkpoint = _open_checkpoint(note, keys, size)
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
            mismatch = _derived_mismatch(leaf)
            if mismatch is not None:
                fail(Failure((leaf.index, 0), subject, mismatch))
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
    # Nodes reaching past the largest stored checkpoint were never written by the integrator.
    async for level, index, _digest in source.nodes():
        if (index + 1) << level > end or index < 0:
            fail(
                Failure(
                    (max(index << level, 0), 3),
                    f"tree node {level}/{index}",
                    f"lies past the signed tree size {end}: no integrator run wrote it",
                )
            )
    for intruder in await source.intruders(end):
        subject = f"entry {intruder.entry_id}"
        if intruder.quarantined:
            fail(
                Failure(
                    (_UNSEALED, intruder.entry_id),
                    subject,
                    f"quarantined by the integrator: it claimed leaf {intruder.leaf_index} past the "
                    "signed tree size (see audit_quarantine and the integrity-quarantine entry)",
                )
            )
        else:
            fail(
                Failure(
                    (max(intruder.leaf_index or 0, 0), 0),
                    f"{subject} (leaf {intruder.leaf_index})",
                    f"its leaf index is outside the signed tree of size {end}: no integrator run "
                    "sealed it (forged; the integrator will quarantine it)",
                )
            )
    # Unsealed entries are not yet protected by the tree, but what search shows of them must
    # still be what their content says.
    async for leaf in source.unsealed_entries():
        mismatch = _derived_mismatch(leaf)
        if mismatch is not None:
            fail(Failure((_UNSEALED, leaf.entry_id), f"entry {leaf.entry_id} (unsealed)", mismatch))
    report.unsealed = await source.unsealed()
    return report


# --- sources -----------------------------------------------------------------

_ENTRY_COLUMNS = (
    AuditEntry.leaf_index,
    AuditEntry.id,
    AuditEntry.content,
    AuditEntry.leaf_hash,
    AuditEntry.recorded_at,
    AuditEntry.event_type,
    AuditEntry.subtype,
    AuditEntry.action,
    AuditEntry.outcome,
    AuditEntry.client_id,
)
_DERIVED = ("recorded_at", "event_type", "subtype", "action", "outcome", "client_id")


async def _refs_of(session: AsyncSession, entry_ids: Sequence[int]) -> dict[int, set[tuple[str, str]]]:
    refs: dict[int, set[tuple[str, str]]] = {entry_id: set() for entry_id in entry_ids}
    if entry_ids:
        rows = await session.execute(
            select(AuditRef.entry_id, AuditRef.kind, AuditRef.value).where(AuditRef.entry_id.in_(entry_ids))
        )
        for entry_id, kind, value in rows:
            refs[int(entry_id)].add((kind, value))
    return refs


def _leaf(
    row: Row[Any, *tuple[Any, ...]], refs: Mapping[int, set[tuple[str, str]]], node: bytes | None = None
) -> Leaf:
    return Leaf(
        -1 if row.leaf_index is None else int(row.leaf_index),
        int(row.id),
        bytes(row.content),
        None if row.leaf_hash is None else bytes(row.leaf_hash),
        None if node is None else bytes(node),
        columns={name: getattr(row, name) for name in _DERIVED},
        refs=frozenset(refs.get(int(row.id), ())),
    )


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
                        select(*_ENTRY_COLUMNS, AuditNode.hash)
                        .outerjoin(
                            AuditNode,
                            and_(AuditNode.level == 0, AuditNode.node_index == AuditEntry.leaf_index),
                        )
                        .where(AuditEntry.leaf_index >= cursor, AuditEntry.leaf_index < end)
                        .order_by(AuditEntry.leaf_index)
                        .limit(BATCH)
                    )
                ).all()
                refs = await _refs_of(session, [int(row.id) for row in rows])
            for row in rows:
                yield _leaf(row, refs, node=row.hash)
            if len(rows) < BATCH:
                return
            cursor = int(rows[-1].leaf_index or 0) + 1

    async def unsealed_entries(self) -> AsyncIterator[Leaf]:
        after = 0
        while True:
            async with self.database.sessions() as session:
                rows = (
                    await session.execute(
                        select(*_ENTRY_COLUMNS)
                        .where(AuditEntry.leaf_index.is_(None), AuditEntry.id > after)
                        .order_by(AuditEntry.id)
                        .limit(BATCH)
                    )
                ).all()
                refs = await _refs_of(session, [int(row.id) for row in rows])
            for row in rows:
                yield _leaf(row, refs)
            if len(rows) < BATCH:
                return
            after = int(rows[-1].id)

    async def intruders(self, tree_size: int) -> list[Intruder]:
        async with self.database.sessions() as session:
            past = await session.execute(
                select(AuditEntry.id, AuditEntry.leaf_index)
                .where((AuditEntry.leaf_index >= tree_size) | (AuditEntry.leaf_index < 0))
                .order_by(AuditEntry.leaf_index)
                .limit(BATCH)
            )
            found = [Intruder(int(i), None if li is None else int(li)) for i, li in past]
            quarantined = await session.execute(
                select(AuditQuarantine.entry_id, AuditQuarantine.leaf_index)
                .order_by(AuditQuarantine.entry_id)
                .limit(BATCH)
            )
            found += [Intruder(int(i), None if li is None else int(li), True) for i, li in quarantined]
            return found

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

    async def unsealed_entries(self) -> AsyncIterator[Leaf]:
        return
        yield  # pragma: no cover - an empty async generator

    async def intruders(self, tree_size: int) -> list[Intruder]:
        return []  # the API serves only sealed leaves below the tree size


async def verify_database(
    database_url: str,
    *,
    verifier: NoteVerifier | LogKeys,
    trusted_note: str | None,
    origin: str | None = None,
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
    verifier: NoteVerifier | LogKeys,
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

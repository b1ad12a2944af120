"""SQL for the encrypted store. Filters happen here, before paging; no HTTP, no rules."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cache
from typing import Any, cast

from sqlalchemy import (
    FromClause,
    Select,
    Table,
    and_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from service.records import kept_totals
from service.records.grant_predicate import GRANTS, NOBODY, Audience, GrantFilter, permit_id, visible
from service.records.paging import PagePosition
from service.store.tables import (
    Base,
    DisclosureGrant,
    MatchKey,
    Organization,
    ResourceVersion,
    SearchToken,
    StoredResource,
    Subject,
)


@dataclass(frozen=True)
class GrantMatch:
    """The disclosure grant that lets an authority see one resource version (named in the audit entry)."""

    rule: str
    consent_id: str
    consent_version: int


@dataclass(frozen=True)
class VersionRow:
    resource_type: str
    id: str
    version_id: int
    subject_id: str
    organization_id: str
    last_updated: datetime
    ciphertext: bytes
    ciphertext_sha256: str
    labels_token: bytes | None = None
    # For an authority: the grant that admitted this very version, from the same statement.
    grant: GrantMatch | None = None


@dataclass(frozen=True)
class SubjectKey:
    """A migrant's wrapped data key, as a read needs it."""

    id: str
    wrapped_key: bytes | None
    key_version: int


@dataclass(frozen=True)
class VisibleRead:
    """What a read needs, fetched in one statement: a version the audience may see, and its key."""

    row: VersionRow
    subject: SubjectKey | None


@dataclass(frozen=True)
class RefusalFacts:
    """What a refused read's audit entry says, from one statement that answers alike for an id
    that names nothing and one that is withheld (no decryption, no second lookup)."""

    exists: bool
    # For an authority and an existing resource: which part of the grants did not match.
    reason: str | None


# Core statements on the tables, built once: the intake writes plain rows, so the
# ORM's unit of work (identity map, per-object bookkeeping) would only cost CPU.
def _table(model: type[Base]) -> Table:
    return cast(Table, model.__table__)


_INSERT_SUBJECTS = insert(_table(Subject))
_INSERT_VERSIONS = insert(_table(ResourceVersion))
_INSERT_RESOURCES = insert(_table(StoredResource))
_INSERT_TOKENS = insert(_table(SearchToken))
_INSERT_GRANTS = insert(_table(DisclosureGrant))


@dataclass
class WriteBatch:
    """Rows of new resource versions, collected so that they are inserted together."""

    subjects: list[dict[str, object]] = field(default_factory=list)
    versions: list[dict[str, object]] = field(default_factory=list)
    resources: list[dict[str, object]] = field(default_factory=list)
    updates: list[tuple[StoredResource, dict[str, object]]] = field(default_factory=list)
    tokens: list[dict[str, object]] = field(default_factory=list)
    cleared: list[tuple[str, str]] = field(default_factory=list)

    def add(
        self,
        version: dict[str, object],
        *,
        clinical_date: datetime | None,
        labels_token: bytes,
        tokens: Iterable[tuple[str, bytes]],
        current: StoredResource | None,
    ) -> None:
        self.versions.append({**version, "labels_token": labels_token})
        pointer = {
            "version_id": version["version_id"],
            "last_updated": version["last_updated"],
            "clinical_date": clinical_date,
        }
        if current is None:
            self.resources.append(
                {
                    "resource_type": version["resource_type"],
                    "id": version["id"],
                    "subject_id": version["subject_id"],
                    "organization_id": version["organization_id"],
                    **pointer,
                }
            )
        else:
            self.updates.append((current, pointer))
            self.cleared.append((current.resource_type, current.id))
        self.tokens.extend(
            {"resource_type": version["resource_type"], "id": version["id"], "param": param, "value": value}
            for param, value in sorted(set(tokens))
        )


@dataclass
class SearchFilter:
    """A search already reduced to columns: tenancy and blind-index values, never clear text."""

    resource_type: str
    # Several types at once ($everything); when set, ``resource_type`` is not used.
    resource_types: Sequence[str] | None = None
    organization_id: str | None = None
    subject_ids: Sequence[str] | None = None
    ids: Sequence[str] | None = None
    token_groups: list[tuple[str, list[bytes]]] = field(default_factory=list)  # AND of ORs
    date_ranges: list[tuple[str, datetime]] = field(default_factory=list)  # (op, bound)
    updated_ranges: list[tuple[str, datetime]] = field(default_factory=list)
    grant: GrantFilter | None = None
    match_nothing: bool = False

    @property
    def audience(self) -> Audience:
        if self.match_nothing:
            return NOBODY
        if self.grant is not None:
            return Audience(grant=self.grant)
        if self.organization_id is not None:
            return Audience(organization_id=self.organization_id)
        return NOBODY


_OPS = {
    "ge": lambda col, v: col >= v,
    "gt": lambda col, v: col > v,
    "le": lambda col, v: col <= v,
    "lt": lambda col, v: col < v,
}


class RecordRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # --- subjects -------------------------------------------------------
    async def subject(self, subject_id: str) -> Subject | None:
        return await self.session.get(Subject, subject_id)

    async def subject_index_key(self, subject_id: str) -> str | None:
        """The kid a migrant's index tokens are under, read with a share lock (see intake)."""
        result = await self.session.execute(
            select(Subject.index_key_id).where(Subject.id == subject_id).with_for_update(read=True)
        )
        return result.scalar_one_or_none()

    async def subject_keys(self, subject_ids: Iterable[str]) -> dict[str, SubjectKey]:
        """The wrapped keys of these migrants, in one statement (columns, not ORM objects)."""
        s = _SUBJECTS
        connection = await self.session.connection()
        result = await connection.execute(
            select(s.c.id, s.c.wrapped_key, s.c.key_version).where(s.c.id.in_(sorted(set(subject_ids))))
        )
        return {row.id: SubjectKey(row.id, row.wrapped_key, row.key_version) for row in result}

    async def current_for_read(
        self, resource_type: str, resource_id: str, audience: Audience
    ) -> VisibleRead | None:
        """A read in one round trip: the current version with its subject key, only if ``audience``
        may see that version (and, for an authority, the grant that admits it). None alike for an
        id that names nothing and for a version that is withheld."""
        return await self._visible_read(
            _read_statement("current", _kind(audience)), audience, resource_type, resource_id
        )

    async def version_for_read(
        self, resource_type: str, resource_id: str, version_id: int, audience: Audience
    ) -> VisibleRead | None:
        """A vread in one round trip, decided on that version's own labels, type and subject."""
        return await self._visible_read(
            _read_statement("version", _kind(audience)), audience, resource_type, resource_id, version_id
        )

    async def _visible_read(
        self,
        statement: Select[Any],
        audience: Audience,
        resource_type: str,
        resource_id: str,
        version_id: int | None = None,
    ) -> VisibleRead | None:
        params: dict[str, object] = {"rtype": resource_type, "rid": resource_id, **audience.params()}
        if version_id is not None:
            params["vid"] = version_id
        connection = await self.session.connection()
        found = (await connection.execute(statement, params)).first()
        if found is None:
            return None
        m = found._mapping
        subject = (
            SubjectKey(m["subject_id"], m["wrapped_key"], m["key_version"])
            if m["key_version"] is not None
            else None
        )
        return VisibleRead(_visible_row(m), subject)

    async def erased_resource(self, resource_type: str, resource_id: str, organization_id: str) -> bool:
        """Did this organization submit this resource, of a migrant since erased?"""
        r, s = _RESOURCES, _SUBJECTS
        connection = await self.session.connection()
        found = await connection.execute(
            select(r.c.id)
            .select_from(r.join(s, s.c.id == r.c.subject_id))
            .where(
                r.c.resource_type == resource_type,
                r.c.id == resource_id,
                r.c.organization_id == organization_id,
                s.c.erased_at.is_not(None),
            )
        )
        return found.first() is not None

    async def refusal_facts(
        self, resource_type: str, resource_id: str, audience: Audience, version_id: int | None = None
    ) -> RefusalFacts:
        """Why a read found nothing to show, for its audit entry only (the caller sees 404 either way).

        One statement, one row, the same plan whether or not the id names anything, and no
        decryption: a refusal must not take measurably longer than a miss (no timing oracle).
        ``version_id``: a vread's version (else the current one)."""
        grant = audience.grant
        params: dict[str, object] = {
            "rtype": resource_type,
            "rid": resource_id,
            "vid": version_id,
            **audience.params(),
        }
        connection = await self.session.connection()
        statement = _REFUSAL_WITH_GRANT if grant is not None else _REFUSAL
        m = (await connection.execute(statement, params)).one()._mapping
        if m["current_version"] is None:
            return RefusalFacts(exists=False, reason=None)
        if grant is None or (version_id is not None and not m["version_exists"]):
            return RefusalFacts(exists=True, reason=None)  # not a consent decision: nothing there
        if not m["grant_ever"]:
            reason = "deny.no-grant"  # no Consent of this migrant names this organization and purpose
        elif not m["grant_now"]:
            reason = "deny.no-grant.period"  # not in force at this time
        elif not m["type_now"]:
            reason = "deny.no-grant.class"  # not this kind of resource
        else:
            reason = "deny.no-grant.labels"  # not a version carrying these sensitivity labels
        return RefusalFacts(exists=True, reason=reason)

    async def permit_for_version(
        self, resource_type: str, resource_id: str, version_id: int, grant: GrantFilter
    ) -> GrantMatch | None:
        """May this organization see this version now, and on which grant? For work outside a
        request (notifications, export, tasks): the same predicate as every read."""
        audience = Audience(grant=grant)
        found = await self.version_for_read(resource_type, resource_id, version_id, audience)
        return found.row.grant if found is not None else None

    async def permits_for_versions(
        self, versions: Iterable[tuple[str, str, int]], grant: GrantFilter
    ) -> dict[tuple[str, str, int], GrantMatch]:
        """:meth:`permit_for_version` for many versions in one statement (a notification's
        events): each version this organization may see now, with the grant that admits it."""
        wanted = sorted(set(versions))
        if not wanted:
            return {}
        connection = await self.session.connection()
        params = {"versioned": wanted, **Audience(grant=grant).params()}
        found: dict[tuple[str, str, int], GrantMatch] = {}
        for m in (await connection.execute(_permits_statement(), params)).mappings():
            found[(m["resource_type"], m["id"], m["version_id"])] = GrantMatch(
                m["rule"], m["consent_id"], m["consent_version"]
            )
        return found

    async def visible_references(
        self, refs: Iterable[tuple[str, str, int | None]], audience: Audience
    ) -> set[tuple[str, str, int | None]]:
        """Which of these references (type, id, version or None for the current one) ``audience``
        may follow: one statement for a whole page, with the predicate that filters reads."""
        wanted = set(refs)
        if not wanted:
            return set()
        params = {
            "versioned": sorted((t, i, n) for t, i, n in wanted if n is not None),
            "current": sorted({(t, i) for t, i, n in wanted if n is None}),
            **audience.params(),
        }
        statement = _references_statement(_kind(audience))
        connection = await self.session.connection()
        result = await connection.execute(statement, params)
        seen: set[tuple[str, str, int | None]] = set()
        for row in result:
            if audience.grant is not None and row.permit_id is None:
                continue
            seen.add((row.resource_type, row.id, row.version_id))
            if row.version_id == row.current_version:
                seen.add((row.resource_type, row.id, None))
        return seen & wanted

    # --- patients by identifier (ifNoneExist) --------------------------
    async def resources_with_identifier(
        self, organization_id: str, resource_type: str, identifier_hash: bytes | Sequence[bytes]
    ) -> list[str]:
        """The clinic's current resources of this type carrying this identifier (blind index,
        or its indexes under every key in use), at most two."""
        hashes = [identifier_hash] if isinstance(identifier_hash, bytes) else list(identifier_hash)
        result = await self.session.execute(
            select(StoredResource.id)
            .join(
                SearchToken,
                and_(
                    SearchToken.resource_type == StoredResource.resource_type,
                    SearchToken.id == StoredResource.id,
                ),
            )
            .where(
                StoredResource.resource_type == resource_type,
                StoredResource.organization_id == organization_id,
                SearchToken.param == "identifier",
                SearchToken.value.in_(hashes),
            )
            .distinct()
            .limit(2)
        )
        return list(result.scalars())

    async def claim_match_keys(self, organization_id: str, claims: Mapping[tuple[str, bytes], str]) -> bool:
        """Claim ifNoneExist keys ((type, identifier hash) -> new resource's id) in one statement.

        False when a concurrent submission holds one of them; this call's own claims are
        then taken back, so that a retry starts from a store this attempt did not touch.
        A key whose holder no longer carries that identifier (corrected since) is taken over.
        No SAVEPOINT: a held key is skipped by ``ON CONFLICT DO NOTHING`` rather than raised.
        Like a plain INSERT, it waits for a concurrent uncommitted claim of the same key.
        """
        if not claims:
            return True
        rows = [
            {
                "organization_id": organization_id,
                "resource_type": rtype,
                "identifier_hash": key,
                "resource_id": resource_id,
            }
            for (rtype, key), resource_id in sorted(claims.items())  # one lock order for all
        ]
        table = _table(MatchKey)
        flavour = sqlite.insert if self.session.get_bind().dialect.name == "sqlite" else postgresql.insert
        statement = (
            flavour(table)
            .values(rows)
            .on_conflict_do_nothing()
            .returning(table.c.resource_type, table.c.identifier_hash)
        )
        claimed = {(row[0], row[1]) for row in (await self.session.execute(statement)).all()}
        held = [key for key in claims if key not in claimed]
        for rtype, key in held:
            if await self.resources_with_identifier(organization_id, rtype, key):
                for claimed_type, claimed_key in claimed:
                    await self.session.execute(
                        delete(MatchKey).where(
                            MatchKey.organization_id == organization_id,
                            MatchKey.resource_type == claimed_type,
                            MatchKey.identifier_hash == claimed_key,
                        )
                    )
                return False
        for rtype, key in held:
            await self.session.execute(
                update(MatchKey)
                .where(
                    MatchKey.organization_id == organization_id,
                    MatchKey.resource_type == rtype,
                    MatchKey.identifier_hash == key,
                )
                .values(resource_id=claims[(rtype, key)])
            )
        return True

    # --- resources ------------------------------------------------------
    async def current(self, resource_type: str, resource_id: str) -> StoredResource | None:
        return await self.session.get(StoredResource, (resource_type, resource_id))

    async def current_for_update(self, resource_type: str, resource_id: str) -> StoredResource | None:
        result = await self.session.execute(
            select(StoredResource)
            .where(StoredResource.resource_type == resource_type, StoredResource.id == resource_id)
            .with_for_update()
        )
        return result.scalar_one_or_none()

    async def existing_with_subjects(
        self, refs: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[StoredResource, Subject | None]]:
        """Current pointers of these resources with their migrant's key row, one query per type."""
        wanted = list(set(refs))
        found: dict[tuple[str, str], tuple[StoredResource, Subject | None]] = {}
        for rtype in sorted({t for t, _ in wanted}):
            ids = sorted(i for t, i in wanted if t == rtype)
            result = await self.session.execute(
                select(StoredResource, Subject)
                .outerjoin(Subject, Subject.id == StoredResource.subject_id)
                .where(StoredResource.resource_type == rtype, StoredResource.id.in_(ids))
            )
            for row, subject in result.all():
                found[(row.resource_type, row.id)] = (row, subject)
        return found

    async def write_batch(self, batch: WriteBatch) -> None:
        """Everything one intake writes, in a handful of multi-row statements (not one per row)."""
        if batch.subjects:
            await self.session.execute(_INSERT_SUBJECTS, batch.subjects)
        for resource_type, resource_id in batch.cleared:
            await self.session.execute(
                delete(SearchToken).where(
                    SearchToken.resource_type == resource_type, SearchToken.id == resource_id
                )
            )
        if batch.versions:
            await self.session.execute(_INSERT_VERSIONS, batch.versions)
        if batch.resources:
            await self.session.execute(_INSERT_RESOURCES, batch.resources)
        if batch.updates:
            # Corrections are rare: the ORM updates the loaded (row-locked) pointers.
            for current, values in batch.updates:
                for key, value in values.items():
                    setattr(current, key, value)
            await self.session.flush()
        if batch.tokens:
            await self.session.execute(_INSERT_TOKENS, batch.tokens)
        # A new current version changes what its migrant's grants admit (a correction may move
        # a resource to another label set, or, in principle, to another migrant). A migrant
        # created in this batch has no grants yet: its Consent's grants are counted as inserted.
        touched = {str(v["subject_id"]) for v in batch.versions}
        touched.update(current.subject_id for current, _ in batch.updates)
        touched.difference_update(str(s["id"]) for s in batch.subjects)
        await self.refresh_grant_matches(touched)

    async def version(self, resource_type: str, resource_id: str, version_id: int) -> VersionRow | None:
        row = await self.session.get(ResourceVersion, (resource_type, resource_id, version_id))
        return version_row(row) if row else None

    async def history(
        self,
        resource_type: str,
        resource_id: str,
        audience: Audience,
        limit: int,
        *,
        since: datetime | None = None,
        at: tuple[datetime, datetime] | None = None,
        before_version: int | None = None,
    ) -> tuple[list[VersionRow], int]:
        """The newest ``limit`` versions ``audience`` may see, each decided on its own labels, type
        and subject, and how many such versions there are in all (``Bundle.total``).

        ``since``: versions written at or after it; ``at``: versions that were current at some
        time in ``[start, end)`` (written before its end, not replaced before its start);
        ``before_version``: the next page, after the last version of the previous one."""
        v = _VERSIONS
        conditions = [v.c.resource_type == resource_type, v.c.id == resource_id, visible(v, audience)]
        if since is not None:
            conditions.append(v.c.last_updated >= since)
        if at is not None:
            later = _VERSIONS.alias("later")
            replaced = (
                select(func.min(later.c.last_updated))
                .where(
                    later.c.resource_type == v.c.resource_type,
                    later.c.id == v.c.id,
                    later.c.version_id > v.c.version_id,
                )
                .scalar_subquery()
            )
            conditions += [v.c.last_updated < at[1], or_(replaced.is_(None), replaced > at[0])]
        if before_version is not None:
            conditions.append(v.c.version_id < before_version)
        inner = (
            select(
                *_VERSION_COLUMNS,
                *_permit_column(v, audience),
                func.count().over().label("visible_total"),
            )
            .where(*conditions)
            .order_by(v.c.version_id.desc())
            .limit(limit)
        )
        statement, order = _with_permit(inner, audience, lambda page: (page.c.version_id.desc(),))
        connection = await self.session.connection()
        result = await connection.execute(statement.order_by(*order), audience.params())
        rows = result.all()
        total = int(rows[0]._mapping["visible_total"]) if rows else 0
        return [_visible_row(row._mapping) for row in rows], total

    # --- search ---------------------------------------------------------
    def _filtered(self, flt: SearchFilter, *columns: Any) -> Select[Any]:
        """Current versions matching the search, only those the filter's audience may see."""
        r, v, t = _RESOURCES, _VERSIONS, _TOKENS
        audience = flt.audience
        query = (
            select(*columns)
            .select_from(
                r.join(
                    v,
                    and_(
                        v.c.resource_type == r.c.resource_type,
                        v.c.id == r.c.id,
                        v.c.version_id == r.c.version_id,
                    ),
                )
            )
            .where(
                r.c.resource_type.in_(list(flt.resource_types))
                if flt.resource_types is not None
                else r.c.resource_type == flt.resource_type
            )
        )
        if flt.subject_ids is not None:
            query = query.where(v.c.subject_id.in_(list(flt.subject_ids)))
        if flt.ids is not None:
            query = query.where(r.c.id.in_(list(flt.ids)))
        for param, values in flt.token_groups:
            query = query.where(
                exists().where(
                    and_(
                        t.c.resource_type == r.c.resource_type,
                        t.c.id == r.c.id,
                        t.c.param == param,
                        t.c.value.in_(values),
                    )
                )
            )
        for op, bound in flt.date_ranges:
            query = query.where(_OPS[op](r.c.clinical_date, bound))
        for op, bound in flt.updated_ranges:
            query = query.where(_OPS[op](r.c.last_updated, bound))
        return query.where(visible(v, audience))  # its parameters: flt.audience.params()

    async def count(self, flt: SearchFilter) -> int:
        """How many current resources the search matches that its audience may see (exact).

        An authority's search of one type with no filter but "updated since" is answered from
        the totals kept with its grants (:meth:`_kept_total`, ``service.records.kept_totals``),
        at a cost that grows with neither the resources nor the migrants. Any other search is
        counted by the statement below.

        On PostgreSQL the count is planned for its own parameters every time, in this backend
        alone. Over the covering indexes (migration 0010_h_bench) it is then one merge pass of
        the versions against the grants: 0.15 s at 100k exams on the bench's scale database.
        The generic plan a prepared statement falls back to after five runs cannot see the
        resource type and probes the grants index once per resource (1.0 s), and so does a
        parallel plan in each of its workers (3 x 0.3 s): searches arrive many at once, and
        CPU is what they share.
        """
        connection = await self.session.connection()
        if _kept_total_answers(flt):
            return await self._kept_total(connection, flt)
        return await self._joined_count(connection, flt)

    async def _joined_count(self, connection: Any, flt: SearchFilter, limit: int | None = None) -> int:
        """The count as one statement over resources, versions and grants (``limit``: stop there)."""
        inner = self._filtered(flt, _RESOURCES.c.id)
        subquery = (inner.limit(limit) if limit is not None else inner).subquery()
        statement = select(func.count()).select_from(subquery)
        if connection.dialect.name != "postgresql":
            result = await connection.execute(statement, flt.audience.params())
            return int(result.scalar_one())
        await connection.execute(_PLAN_THE_COUNT)
        try:
            result = await connection.execute(statement, flt.audience.params())
            counted = int(result.scalar_one())
        except Exception:
            # The count failed (often: the connection is gone). Reset if the connection still
            # takes statements; otherwise the failure itself must surface, not the reset's
            # PendingRollbackError, so that a lost database is answered 503, not 500.
            with contextlib.suppress(Exception):
                await connection.execute(_PLAN_AS_BEFORE)
            raise
        # Outside a transaction (the read sessions) the setting would outlive this statement on
        # the pooled connection; inside one, a rollback undoes it anyway.
        await connection.execute(_PLAN_AS_BEFORE)
        return counted

    async def _kept_total(self, connection: Any, flt: SearchFilter) -> int:
        """An authority's total of one type from the counts kept with its grants in force now.

        At most one lower bound on ``_lastUpdated`` (an authority's "everything since"): the
        total of the type, less the visible resources at or before the bound, counted by the
        joined statement over that (usually short) stretch of the ``_lastUpdated`` index. When
        that stretch holds more than ``_COMPLEMENT_LIMIT`` visible resources (a recent bound),
        the joined count of the search itself is the cheaper one and answers instead.
        """
        total = await kept_totals.total(
            self.session, {**flt.audience.params(), "resource_type": flt.resource_type}
        )
        if not flt.updated_ranges:
            return total
        op, bound = flt.updated_ranges[0]
        before = replace(flt, updated_ranges=[(_COMPLEMENT_OF[op], bound)])
        outside = await self._joined_count(connection, before, limit=_COMPLEMENT_LIMIT)
        if outside >= _COMPLEMENT_LIMIT:
            return await self._joined_count(connection, flt)
        return total - outside

    async def replace_grants(
        self, subject_id: str, grants: Sequence[Mapping[str, object]], *, new_subject: bool = False
    ) -> None:
        """Replace a migrant's grants (rows of ``disclosure_grants`` without id).

        ``new_subject``: the migrant was created in this transaction, so there is nothing to delete.
        """
        change: Counter[kept_totals.Key] = Counter()
        if not new_subject:
            _, removed = await kept_totals.delete_grants(self.session, subject_id)
            change.subtract(removed)
        if grants:
            await self.session.execute(_INSERT_GRANTS, list(grants))
            change.update(await self._recount_grants([subject_id]))
        await kept_totals.record(self.session, change)

    async def set_labels_token(self, row: VersionRow, token: bytes) -> None:
        """Store a version's new label token (a relabel, or its migrant moved to a new index key)."""
        await self.session.execute(
            update(ResourceVersion)
            .where(
                ResourceVersion.resource_type == row.resource_type,
                ResourceVersion.id == row.id,
                ResourceVersion.version_id == row.version_id,
            )
            .values(labels_token=token)
        )

    async def refresh_grant_matches(self, subject_ids: Iterable[str]) -> None:
        """Recount, for every grant of these migrants, the current resources it admits.

        Called in the transaction of each change to either side: a new current version
        (``write_batch``) and a migrant's new grants (``replace_grants``, which relabelling and
        every Consent write go through). An erasure deletes the grants, and the count with them.
        The rule is :func:`visible`'s without the time: same subject, type and label set.
        """
        await kept_totals.record(self.session, await self._recount_grants(subject_ids))

    async def _recount_grants(self, subject_ids: Iterable[str]) -> Counter[kept_totals.Key]:
        """Recount these migrants' grants; returns the change of the kept totals."""
        wanted = sorted(set(subject_ids))
        if not wanted:
            return Counter()
        before = await kept_totals.locked_counts(self.session, wanted)
        for start in range(0, len(wanted), 500):
            await self.session.execute(_REFRESH_MATCHES, {"subjects": wanted[start : start + 500]})
        change = await kept_totals.locked_counts(self.session, wanted)
        change.subtract(before)
        return change

    async def current_of_type(self, subject_id: str, resource_type: str) -> list[VersionRow]:
        result = await self.session.execute(
            select(ResourceVersion)
            .join(
                StoredResource,
                and_(
                    StoredResource.resource_type == ResourceVersion.resource_type,
                    StoredResource.id == ResourceVersion.id,
                    StoredResource.version_id == ResourceVersion.version_id,
                ),
            )
            .where(StoredResource.subject_id == subject_id, StoredResource.resource_type == resource_type)
        )
        return [version_row(r) for r in result.scalars()]

    async def organization_ids(self) -> set[str]:
        result = await self.session.execute(select(Organization.id))
        return set(result.scalars())

    async def search(
        self,
        flt: SearchFilter,
        *,
        newest_first: bool,
        limit: int,
        offset: int = 0,
        after: PagePosition | None = None,
    ) -> list[VersionRow]:
        """A page in ``(last_updated, id)`` order, starting after ``after`` (keyset) or at ``offset``;
        each row with the permit that admitted it, from the same statement."""
        r = _RESOURCES
        audience = flt.audience
        filtered = self._filtered(
            flt,
            *_VERSION_COLUMNS,
            *_permit_column(_VERSIONS, audience),
            r.c.last_updated.label("page_updated"),
        )
        if after is not None:
            key = tuple_(r.c.last_updated, r.c.id)
            start = tuple_(
                bindparam("after_updated", after.last_updated, type_=r.c.last_updated.type),
                bindparam("after_id", after.resource_id),
            )
            filtered = filtered.where(key < start if newest_first else key > start)
        order = (
            (r.c.last_updated.desc(), r.c.id.desc())
            if newest_first
            else (r.c.last_updated.asc(), r.c.id.asc())
        )
        inner = filtered.order_by(*order).limit(limit).offset(offset)

        def page_order(page: FromClause) -> tuple[Any, ...]:
            if newest_first:
                return (page.c.page_updated.desc(), page.c.id.desc())
            return (page.c.page_updated.asc(), page.c.id.asc())

        statement, outer_order = _with_permit(inner, audience, page_order)
        connection = await self.session.connection()  # Core rows: no ORM identity map to fill
        result = await connection.execute(statement.order_by(*outer_order), audience.params())
        return [_visible_row(row._mapping) for row in result]

    async def current_of_subjects(
        self,
        subject_ids: Sequence[str],
        resource_types: Sequence[str],
        audience: Audience,
        updated_ranges: Sequence[tuple[str, datetime]] = (),
    ) -> list[VersionRow]:
        """The current versions of these migrants' resources of these types that ``audience`` may
        see (``visible``, on each version's own row), each with the permit that admitted it, in
        (migrant, type, id) order: an export's batch.

        Driven from the migrants (``resources`` by subject), so that a batch costs what it holds
        whatever the size of the store; a search's statement (``search``) is driven from the
        type's page order, and for a batch of migrants the planner would read every current
        resource of the types, or every grant of the authority, to find them."""
        r, v = _RESOURCES, _VERSIONS
        query = (
            select(
                *_VERSION_COLUMNS,
                *_permit_column(v, audience),
                r.c.last_updated.label("page_updated"),
            )
            .select_from(
                r.join(
                    v,
                    and_(
                        v.c.resource_type == r.c.resource_type,
                        v.c.id == r.c.id,
                        v.c.version_id == r.c.version_id,
                    ),
                )
            )
            .where(r.c.subject_id.in_(list(subject_ids)), r.c.resource_type.in_(list(resource_types)))
            .where(visible(v, audience))
        )
        for op, bound in updated_ranges:
            query = query.where(_OPS[op](r.c.last_updated, bound))

        def batch_order(page: FromClause) -> tuple[Any, ...]:
            return (page.c.subject_id, page.c.resource_type, page.c.id)

        statement, order = _with_permit(query, audience, batch_order)
        connection = await self.session.connection()
        result = await connection.execute(statement.order_by(*order), audience.params())
        return [_visible_row(row._mapping) for row in result]


def _kept_total_answers(flt: SearchFilter) -> bool:
    """Can the counts kept with the grants answer this search's total? An authority's search
    of one type, filtered by nothing but at most one lower bound on ``_lastUpdated``."""
    return (
        flt.grant is not None
        and not flt.match_nothing
        and flt.resource_types is None
        and flt.subject_ids is None
        and flt.ids is None
        and not flt.token_groups
        and not flt.date_ranges
        and (
            not flt.updated_ranges
            or (len(flt.updated_ranges) == 1 and flt.updated_ranges[0][0] in _COMPLEMENT_OF)
        )
    )


# "After the bound" and its complement, "at or before it" (``last_updated`` is never NULL).
_COMPLEMENT_OF = {"gt": "le", "ge": "lt"}
# Up to this many visible resources before a lower bound, the kept total less them is cheaper
# than the joined count of the search itself.
_COMPLEMENT_LIMIT = 2000


def _refresh_matches_statement() -> Any:
    g, v, r = _GRANTS, _VERSIONS, _RESOURCES
    admitted = (
        select(func.count())
        .select_from(
            v.join(
                r,
                and_(
                    r.c.resource_type == v.c.resource_type, r.c.id == v.c.id, r.c.version_id == v.c.version_id
                ),
            )
        )
        .where(
            v.c.resource_type == g.c.resource_type,
            v.c.subject_id == g.c.subject_id,
            v.c.labels_token == g.c.labels_token,
        )
        .scalar_subquery()
    )
    return (
        update(g)
        .where(g.c.subject_id.in_(bindparam("subjects", expanding=True)))
        .values(current_matches=admitted)
    )


# The planner settings of a search's count (see RecordRepository.count), each set and put back
# in one statement.
_PLAN_THE_COUNT = text(
    "SELECT set_config('max_parallel_workers_per_gather', '0', false), "
    "set_config('plan_cache_mode', 'force_custom_plan', false)"
)
_PLAN_AS_BEFORE = text(
    "SELECT set_config(name, reset_val, false) FROM pg_settings "
    "WHERE name IN ('max_parallel_workers_per_gather', 'plan_cache_mode')"
)
_RESOURCES = _table(StoredResource)
_VERSIONS = _table(ResourceVersion)
_SUBJECTS = _table(Subject)
_TOKENS = _table(SearchToken)
_GRANTS = GRANTS
# In VersionRow's field order.
_VERSION_COLUMNS = (
    _VERSIONS.c.resource_type,
    _VERSIONS.c.id,
    _VERSIONS.c.version_id,
    _VERSIONS.c.subject_id,
    _VERSIONS.c.organization_id,
    _VERSIONS.c.last_updated,
    _VERSIONS.c.ciphertext,
    _VERSIONS.c.ciphertext_sha256,
    _VERSIONS.c.labels_token,
)
_PERMIT_COLUMNS = (_GRANTS.c.rule, _GRANTS.c.consent_id, _GRANTS.c.consent_version)
_REFRESH_MATCHES = _refresh_matches_statement()


def _kind(audience: Audience) -> str:
    return "grant" if audience.grant is not None else "tenancy" if audience.organization_id else "nobody"


def _permit_column(version: FromClause, audience: Audience) -> tuple[Any, ...]:
    return (permit_id(version).label("permit_id"),) if audience.grant is not None else ()


def _with_permit(inner: Select[Any], audience: Audience, order: Any) -> tuple[Select[Any], tuple[Any, ...]]:
    """For an authority, the page with the rule and consent version of the grant that admitted
    each row (joined once per row of the page, not per candidate); unchanged otherwise."""
    page = inner.subquery("page")
    columns = [page.c[c.name] for c in _VERSION_COLUMNS]
    extra = [c for c in page.c if c.name in ("wrapped_key", "key_version", "visible_total")]
    if audience.grant is None:
        return select(*columns, *extra).select_from(page), order(page)
    g = _GRANTS
    statement = select(*columns, *extra, *_PERMIT_COLUMNS).select_from(
        page.outerjoin(g, g.c.id == page.c.permit_id)
    )
    return statement, order(page)


def _visible_row(m: Any) -> VersionRow:
    grant = (
        GrantMatch(m["rule"], m["consent_id"], m["consent_version"]) if m.get("rule") is not None else None
    )
    return VersionRow(
        resource_type=m["resource_type"],
        id=m["id"],
        version_id=m["version_id"],
        subject_id=m["subject_id"],
        organization_id=m["organization_id"],
        last_updated=m["last_updated"],
        ciphertext=m["ciphertext"],
        ciphertext_sha256=m["ciphertext_sha256"],
        labels_token=m["labels_token"],
        grant=grant,
    )


@cache
def _read_statement(which: str, kind: str) -> Select[Any]:
    """A read ("current") or vread ("version") for one kind of audience, built once per kind
    (SQLAlchemy caches compiled statements by statement object)."""
    r, v, s = _RESOURCES, _VERSIONS, _SUBJECTS
    audience = {
        "grant": Audience(grant=GrantFilter("", "", datetime.min)),
        "tenancy": Audience(organization_id=""),
        "nobody": NOBODY,
    }[kind]  # only the kind matters: the values are bound at execution
    source: FromClause
    if which == "current":
        source = r.join(
            v,
            and_(v.c.resource_type == r.c.resource_type, v.c.id == r.c.id, v.c.version_id == r.c.version_id),
        )
        where = [r.c.resource_type == bindparam("rtype"), r.c.id == bindparam("rid")]
    else:
        source = v
        where = [
            v.c.resource_type == bindparam("rtype"),
            v.c.id == bindparam("rid"),
            v.c.version_id == bindparam("vid"),
        ]
    inner = (
        select(*_VERSION_COLUMNS, s.c.wrapped_key, s.c.key_version, *_permit_column(v, audience))
        .select_from(source.outerjoin(s, s.c.id == v.c.subject_id))
        .where(*where, visible(v, audience))
    )
    statement, _ = _with_permit(inner, audience, lambda page: ())
    return statement


@cache
def _references_statement(kind: str) -> Select[Any]:
    """Which of a page's references (``versioned``: type, id, version; ``current``: type, id)
    one kind of audience may follow. Built once per kind: a page's check is one round trip."""
    r, v = _RESOURCES, _VERSIONS
    which = or_(
        tuple_(v.c.resource_type, v.c.id, v.c.version_id).in_(bindparam("versioned", expanding=True)),
        and_(
            tuple_(v.c.resource_type, v.c.id).in_(bindparam("current", expanding=True)),
            v.c.version_id == r.c.version_id,
        ),
    )
    statement = (
        select(v.c.resource_type, v.c.id, v.c.version_id, r.c.version_id.label("current_version"))
        .select_from(v.join(r, and_(r.c.resource_type == v.c.resource_type, r.c.id == v.c.id)))
        .where(which)
    )
    if kind == "grant":
        # The permit as a per-row subquery rather than a semi-join: the statement is driven
        # by the page's few references whatever the planner thinks of the grants table.
        return statement.add_columns(permit_id(v).label("permit_id"))
    audience = Audience(organization_id="") if kind == "tenancy" else NOBODY
    return statement.where(visible(v, audience))


@cache
def _permits_statement() -> Select[Any]:
    """Versions (``versioned``: type, id, version) an authority may see, with the permit of each:
    the grant chosen as :func:`permit_id` chooses it for every read, so the audit entry names the
    same consent whichever path asks."""
    v, g = _VERSIONS, _GRANTS
    page = (
        select(v.c.resource_type, v.c.id, v.c.version_id, permit_id(v).label("permit_id"))
        .where(tuple_(v.c.resource_type, v.c.id, v.c.version_id).in_(bindparam("versioned", expanding=True)))
        .subquery("asked")
    )
    return select(page.c.resource_type, page.c.id, page.c.version_id, *_PERMIT_COLUMNS).select_from(
        page.join(g, g.c.id == page.c.permit_id)
    )


def _refusal_statement(*, with_grant: bool) -> Select[Any]:
    """One row always: the current version id (NULL: no such resource) and, for an authority,
    which part of the grants fails to match. Every subquery runs whether or not the id exists."""
    r, v, g = _RESOURCES, _VERSIONS, _GRANTS
    target = (r.c.resource_type == bindparam("rtype"), r.c.id == bindparam("rid"))
    columns: list[Any] = [
        select(r.c.version_id).where(*target).scalar_subquery().label("current_version"),
        exists()
        .where(
            v.c.resource_type == bindparam("rtype"),
            v.c.id == bindparam("rid"),
            v.c.version_id == bindparam("vid", type_=v.c.version_id.type),
        )
        .label("version_exists"),
    ]
    if with_grant:
        at = bindparam("grant_at", type_=g.c.valid_from.type)
        subject = select(r.c.subject_id).where(*target).scalar_subquery()
        mine = (
            g.c.subject_id == subject,
            g.c.organization_id == bindparam("grant_org"),
            g.c.purpose == bindparam("grant_purpose"),
        )
        now = (
            or_(g.c.valid_from.is_(None), g.c.valid_from <= at),
            or_(g.c.valid_to.is_(None), g.c.valid_to > at),
        )
        columns += [
            exists().where(*mine).label("grant_ever"),
            exists().where(*mine, *now).label("grant_now"),
            exists().where(*mine, *now, g.c.resource_type == bindparam("rtype")).label("type_now"),
        ]
    return select(*columns)


_REFUSAL = _refusal_statement(with_grant=False)
_REFUSAL_WITH_GRANT = _refusal_statement(with_grant=True)


def version_row(row: ResourceVersion) -> VersionRow:
    return VersionRow(
        resource_type=row.resource_type,
        id=row.id,
        version_id=row.version_id,
        subject_id=row.subject_id,
        organization_id=row.organization_id,
        last_updated=row.last_updated,
        ciphertext=row.ciphertext,
        ciphertext_sha256=row.ciphertext_sha256,
        labels_token=row.labels_token,
    )

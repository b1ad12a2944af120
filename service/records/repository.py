"""SQL for the encrypted store. Filters happen here, before paging; no HTTP, no rules."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import cast

from sqlalchemy import (
    ColumnElement,
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
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from service.records.paging import PagePosition
from service.store.tables import (
    Base,
    DisclosureGrant,
    Organization,
    PatientKey,
    ResourceVersion,
    SearchToken,
    StoredResource,
    Subject,
)


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


@dataclass(frozen=True)
class SubjectKey:
    """A migrant's wrapped data key, as a read needs it."""

    id: str
    wrapped_key: bytes | None
    key_version: int


@dataclass(frozen=True)
class GrantMatch:
    """The disclosure grant that lets an authority see one resource (named in the audit entry)."""

    rule: str
    consent_id: str
    consent_version: int


@dataclass(frozen=True)
class CurrentRead:
    """What a read needs, fetched in one statement: the current version, its key, who may see it."""

    row: VersionRow
    organization_id: str
    subject: SubjectKey | None
    grant: GrantMatch | None


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
        self.versions.append(version)
        pointer = {
            "version_id": version["version_id"],
            "last_updated": version["last_updated"],
            "clinical_date": clinical_date,
            "labels_token": labels_token,
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


@dataclass(frozen=True)
class GrantFilter:
    """Only what a disclosure grant lets this organization receive, for this purpose, now."""

    organization_id: str
    purpose: str
    at: datetime


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

    async def subject_keys(self, subject_ids: Iterable[str]) -> dict[str, SubjectKey]:
        """The wrapped keys of these migrants, in one statement (columns, not ORM objects)."""
        s = _SUBJECTS
        connection = await self.session.connection()
        result = await connection.execute(
            select(s.c.id, s.c.wrapped_key, s.c.key_version).where(s.c.id.in_(sorted(set(subject_ids))))
        )
        return {row.id: SubjectKey(row.id, row.wrapped_key, row.key_version) for row in result}

    async def current_for_read(
        self, resource_type: str, resource_id: str, grant: GrantFilter | None
    ) -> CurrentRead | None:
        """A read in one round trip: the current version, the subject key and, for an authority,
        the grant in force that matches the resource's type and exact label set (or none)."""
        params: dict[str, object] = {"rtype": resource_type, "rid": resource_id}
        if grant is not None:
            params.update(org=grant.organization_id, purpose=grant.purpose, at=grant.at)
        connection = await self.session.connection()
        result = await connection.execute(_READ_WITH_GRANT if grant else _READ, params)
        found = result.first()
        if found is None:
            return None
        m = found._mapping
        row = VersionRow(
            resource_type=resource_type,
            id=resource_id,
            version_id=m["version_id"],
            subject_id=m["subject_id"],
            organization_id=m["version_organization_id"],
            last_updated=m["last_updated"],
            ciphertext=m["ciphertext"],
            ciphertext_sha256=m["ciphertext_sha256"],
            labels_token=m["labels_token"],
        )
        subject = (
            SubjectKey(m["subject_id"], m["wrapped_key"], m["key_version"])
            if m["key_version"] is not None
            else None
        )
        matched = (
            GrantMatch(m["rule"], m["consent_id"], m["consent_version"])
            if grant is not None and m["rule"] is not None
            else None
        )
        return CurrentRead(row, m["organization_id"], subject, matched)

    # --- patients by identifier (ifNoneExist) --------------------------
    async def patients_with_identifier(self, organization_id: str, identifier_hash: bytes) -> list[str]:
        """The clinic's current Patients carrying this identifier (blind index), at most two."""
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
                StoredResource.resource_type == "Patient",
                StoredResource.organization_id == organization_id,
                SearchToken.param == "identifier",
                SearchToken.value == identifier_hash,
            )
            .limit(2)
        )
        return list(result.scalars())

    async def claim_match_keys(self, organization_id: str, claims: Mapping[bytes, str]) -> bool:
        """Claim ifNoneExist keys (identifier hash -> new migrant's id) in one statement.

        False when a concurrent submission holds one of them; this call's own claims are
        then taken back, so that a retry starts from a store this attempt did not touch.
        A key whose holder no longer carries that identifier (corrected since) is taken over.
        No SAVEPOINT: a held key is skipped by ``ON CONFLICT DO NOTHING`` rather than raised.
        Like a plain INSERT, it waits for a concurrent uncommitted claim of the same key.
        """
        if not claims:
            return True
        rows = [
            {"organization_id": organization_id, "identifier_hash": key, "patient_id": patient_id}
            for key, patient_id in sorted(claims.items())  # one lock order for every transaction
        ]
        table = _table(PatientKey)
        flavour = sqlite.insert if self.session.get_bind().dialect.name == "sqlite" else postgresql.insert
        statement = flavour(table).values(rows).on_conflict_do_nothing().returning(table.c.identifier_hash)
        claimed = set((await self.session.execute(statement)).scalars())
        held = [key for key in claims if key not in claimed]
        for key in held:
            if await self.patients_with_identifier(organization_id, key):
                if claimed:
                    await self.session.execute(
                        delete(PatientKey).where(
                            PatientKey.organization_id == organization_id,
                            PatientKey.identifier_hash.in_(sorted(claimed)),
                        )
                    )
                return False
        for key in held:
            await self.session.execute(
                update(PatientKey)
                .where(PatientKey.organization_id == organization_id, PatientKey.identifier_hash == key)
                .values(patient_id=claims[key])
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

    async def version(self, resource_type: str, resource_id: str, version_id: int) -> VersionRow | None:
        row = await self.session.get(ResourceVersion, (resource_type, resource_id, version_id))
        return _version_row(row) if row else None

    async def history(self, resource_type: str, resource_id: str, limit: int) -> list[VersionRow]:
        result = await self.session.execute(
            select(ResourceVersion)
            .where(ResourceVersion.resource_type == resource_type, ResourceVersion.id == resource_id)
            .order_by(ResourceVersion.version_id.desc())
            .limit(limit)
        )
        return [_version_row(r) for r in result.scalars()]

    # --- search ---------------------------------------------------------
    def _filtered(self, flt: SearchFilter) -> Select[StoredResource]:
        query = select(StoredResource).where(
            StoredResource.resource_type.in_(list(flt.resource_types))
            if flt.resource_types is not None
            else StoredResource.resource_type == flt.resource_type
        )
        if flt.organization_id is not None:
            query = query.where(StoredResource.organization_id == flt.organization_id)
        if flt.subject_ids is not None:
            query = query.where(StoredResource.subject_id.in_(list(flt.subject_ids)))
        if flt.ids is not None:
            query = query.where(StoredResource.id.in_(list(flt.ids)))
        for param, values in flt.token_groups:
            query = query.where(
                exists().where(
                    and_(
                        SearchToken.resource_type == StoredResource.resource_type,
                        SearchToken.id == StoredResource.id,
                        SearchToken.param == param,
                        SearchToken.value.in_(values),
                    )
                )
            )
        for op, bound in flt.date_ranges:
            query = query.where(_OPS[op](StoredResource.clinical_date, bound))
        for op, bound in flt.updated_ranges:
            query = query.where(_OPS[op](StoredResource.last_updated, bound))
        if flt.grant is not None:
            query = query.where(exists().where(_grant_matches(flt.grant)))
        if flt.match_nothing:
            query = query.where(StoredResource.id.is_(None))
        return query

    async def count(self, flt: SearchFilter) -> int:
        subquery = self._filtered(flt).with_only_columns(StoredResource.id).subquery()
        result = await self.session.execute(select(func.count()).select_from(subquery))
        return int(result.scalar_one())

    async def grants_for_subjects(
        self, grant: GrantFilter, subject_ids: Iterable[str], resource_types: Iterable[str]
    ) -> dict[tuple[str, str, bytes], GrantMatch]:
        """The grants in force for these migrants, by (migrant, resource type, label set): which
        consent let each row of a page through, named in its disclosure's audit entry."""
        g = _GRANTS
        connection = await self.session.connection()
        result = await connection.execute(
            select(
                g.c.subject_id,
                g.c.resource_type,
                g.c.labels_token,
                g.c.rule,
                g.c.consent_id,
                g.c.consent_version,
            )
            .where(
                g.c.subject_id.in_(sorted(set(subject_ids))),
                # Only the page's types: a migrant has a grant per type, and a page of Patients
                # needs one row per migrant, not one per type.
                g.c.resource_type.in_(sorted(set(resource_types))),
                g.c.organization_id == grant.organization_id,
                g.c.purpose == grant.purpose,
                or_(g.c.valid_from.is_(None), g.c.valid_from <= grant.at),
                or_(g.c.valid_to.is_(None), g.c.valid_to > grant.at),
            )
            .order_by(g.c.consent_id, g.c.consent_version)
        )
        found: dict[tuple[str, str, bytes], GrantMatch] = {}
        for row in result:  # where two grants overlap, the first in order, as a single read picks
            key = (row.subject_id, row.resource_type, row.labels_token)
            found.setdefault(key, GrantMatch(row.rule, row.consent_id, row.consent_version))
        return found

    async def replace_grants(
        self, subject_id: str, grants: Sequence[Mapping[str, object]], *, new_subject: bool = False
    ) -> None:
        """Replace a migrant's grants (rows of ``disclosure_grants`` without id).

        ``new_subject``: the migrant was created in this transaction, so there is nothing to delete.
        """
        if not new_subject:
            await self.session.execute(
                delete(DisclosureGrant).where(DisclosureGrant.subject_id == subject_id)
            )
        if grants:
            await self.session.execute(_INSERT_GRANTS, list(grants))

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
        return [_version_row(r) for r in result.scalars()]

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
        """A page in ``(last_updated, id)`` order, starting after ``after`` (keyset) or at ``offset``."""
        order = (
            (StoredResource.last_updated.desc(), StoredResource.id.desc())
            if newest_first
            else (StoredResource.last_updated.asc(), StoredResource.id.asc())
        )
        filtered = self._filtered(flt)
        if after is not None:
            key = tuple_(StoredResource.last_updated, StoredResource.id)
            start = tuple_(
                bindparam("after_updated", after.last_updated, type_=StoredResource.last_updated.type),
                bindparam("after_id", after.resource_id),
            )
            filtered = filtered.where(key < start if newest_first else key > start)
        page = filtered.order_by(*order).limit(limit).offset(offset).subquery()
        v = _VERSIONS
        query = (
            select(*_VERSION_COLUMNS, page.c.labels_token)
            .select_from(
                v.join(
                    page,
                    and_(
                        v.c.resource_type == page.c.resource_type,
                        v.c.id == page.c.id,
                        v.c.version_id == page.c.version_id,
                    ),
                )
            )
            .order_by(
                *(
                    (page.c.last_updated.desc(), page.c.id.desc())
                    if newest_first
                    else (page.c.last_updated.asc(), page.c.id.asc())
                )
            )
        )
        connection = await self.session.connection()  # Core rows: no ORM identity map to fill
        result = await connection.execute(query)
        return [VersionRow(*row) for row in result]


def _grant_matches(grant: GrantFilter) -> ColumnElement[bool]:
    return and_(
        DisclosureGrant.subject_id == StoredResource.subject_id,
        DisclosureGrant.organization_id == grant.organization_id,
        DisclosureGrant.purpose == grant.purpose,
        DisclosureGrant.resource_type == StoredResource.resource_type,
        DisclosureGrant.labels_token == StoredResource.labels_token,
        or_(DisclosureGrant.valid_from.is_(None), DisclosureGrant.valid_from <= grant.at),
        or_(DisclosureGrant.valid_to.is_(None), DisclosureGrant.valid_to > grant.at),
    )


_RESOURCES = _table(StoredResource)
_VERSIONS = _table(ResourceVersion)
_SUBJECTS = _table(Subject)
_GRANTS = _table(DisclosureGrant)
# In VersionRow's field order (its labels_token comes from the current pointer).
_VERSION_COLUMNS = (
    _VERSIONS.c.resource_type,
    _VERSIONS.c.id,
    _VERSIONS.c.version_id,
    _VERSIONS.c.subject_id,
    _VERSIONS.c.organization_id,
    _VERSIONS.c.last_updated,
    _VERSIONS.c.ciphertext,
    _VERSIONS.c.ciphertext_sha256,
)


def _read_statement(*, with_grant: bool) -> Select[tuple[object, ...]]:
    """Built once per kind (SQLAlchemy caches compiled statements by statement object)."""
    r, v, s, g = _RESOURCES, _VERSIONS, _SUBJECTS, _GRANTS
    joined = r.join(
        v, and_(v.c.resource_type == r.c.resource_type, v.c.id == r.c.id, v.c.version_id == r.c.version_id)
    ).outerjoin(s, s.c.id == r.c.subject_id)
    columns = [
        r.c.organization_id,
        r.c.labels_token,
        v.c.version_id,
        v.c.subject_id,
        v.c.organization_id.label("version_organization_id"),
        v.c.last_updated,
        v.c.ciphertext,
        v.c.ciphertext_sha256,
        s.c.wrapped_key,
        s.c.key_version,
    ]
    order = []
    if with_grant:
        at = bindparam("at", type_=g.c.valid_from.type)
        joined = joined.outerjoin(
            g,
            and_(
                g.c.subject_id == r.c.subject_id,
                g.c.organization_id == bindparam("org"),
                g.c.purpose == bindparam("purpose"),
                g.c.resource_type == r.c.resource_type,
                g.c.labels_token == r.c.labels_token,
                or_(g.c.valid_from.is_(None), g.c.valid_from <= at),
                or_(g.c.valid_to.is_(None), g.c.valid_to > at),
            ),
        )
        columns += [g.c.rule, g.c.consent_id, g.c.consent_version]
        order = [g.c.consent_id, g.c.consent_version]
    return (
        select(*columns)
        .select_from(joined)
        .where(r.c.resource_type == bindparam("rtype"), r.c.id == bindparam("rid"))
        .order_by(*order)
        .limit(1)
    )


_READ = _read_statement(with_grant=False)
_READ_WITH_GRANT = _read_statement(with_grant=True)


def _version_row(row: ResourceVersion, labels_token: bytes | None = None) -> VersionRow:
    return VersionRow(
        resource_type=row.resource_type,
        id=row.id,
        version_id=row.version_id,
        subject_id=row.subject_id,
        organization_id=row.organization_id,
        last_updated=row.last_updated,
        ciphertext=row.ciphertext,
        ciphertext_sha256=row.ciphertext_sha256,
        labels_token=labels_token,
    )

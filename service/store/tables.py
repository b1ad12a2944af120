"""ORM tables. Alembic owns the schema; these classes mirror the migrations
(a test compares them). Column comments say why a column is in clear."""

from __future__ import annotations

from datetime import UTC, date, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UtcDateTime(TypeDecorator[datetime]):
    """Timestamps are always aware UTC in Python. SQLite drops the zone on the way back;
    this puts it back, so that every timestamp the API writes says Z."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime: store aware UTC timestamps only")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Organization(Base):
    """Clinics, receiving authorities, auditors and the operator: not PHI."""

    __tablename__ = "organizations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    jurisdiction: Mapped[str | None] = mapped_column(String(64))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class Client(Base):
    """A machine client (SMART Backend Services) belonging to one organization."""

    __tablename__ = "clients"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    description: Mapped[str | None] = mapped_column(String(200))
    # Public keys only (checked at registration); a JWKS URL is fetched instead.
    jwks: Mapped[dict[str, object] | None] = mapped_column(JSON)
    jwks_url: Mapped[str | None] = mapped_column(Text)
    scopes: Mapped[str] = mapped_column(Text)
    purposes: Mapped[str] = mapped_column(Text, default="")
    # The purpose a token carries when the client asks for none (one of ``purposes``).
    default_purpose: Mapped[str | None] = mapped_column(String(32))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    disabled_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class AssertionJti(Base):
    """Client assertion ids already used, kept until the assertion would have expired."""

    __tablename__ = "assertion_jtis"

    client_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    jti: Mapped[str] = mapped_column(String(255), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())

    __table_args__ = (Index("ix_assertion_jtis_expires_at", "expires_at"),)


class Subject(Base):
    """One migrant. Holds only the wrapped subject key: destroying it erases every
    version of that migrant's data, in the database and in every backup."""

    __tablename__ = "subjects"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    wrapped_key: Mapped[bytes | None] = mapped_column(LargeBinary)
    key_version: Mapped[int] = mapped_column(Integer)
    # The KEK version wrapping it (from the blob's header): what a rotation has left to rewrap.
    kek_version: Mapped[int | None] = mapped_column(Integer, index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    erased_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # The blind-index key (kid) every index token of this migrant is under: search tokens, match
    # keys, label tokens of versions and grants. What an index rotation has left to move; NULL:
    # written before it was recorded (the one key there was). Never key material.
    index_key_id: Mapped[str | None] = mapped_column(String(64), index=True)


class StoredResource(Base):
    """The current version of a resource, with only what routing and search need in clear."""

    __tablename__ = "resources"

    resource_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Pseudonymous subject id (the Patient id): routes reads, consent and erasure.
    subject_id: Mapped[str] = mapped_column(ForeignKey("subjects.id"))
    # The submitting clinic: tenancy.
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    version_id: Mapped[int] = mapped_column(Integer)
    last_updated: Mapped[datetime] = mapped_column(UtcDateTime())
    # The resource's clinical date (exam day), for `date` search.
    clinical_date: Mapped[datetime | None] = mapped_column(UtcDateTime())

    __table_args__ = (
        Index("ix_resources_org_type_updated", "organization_id", "resource_type", "last_updated"),
        Index("ix_resources_subject_type", "subject_id", "resource_type"),
        # Covering (migration 0010_h_bench): a search page's order and its total from the index.
        Index("ix_resources_type_page", "resource_type", "last_updated", "id", "version_id"),
    )


class ResourceVersion(Base):
    """Every version ever written, encrypted under the subject key; never updated in place."""

    __tablename__ = "resource_versions"

    resource_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    subject_id: Mapped[str] = mapped_column(ForeignKey("subjects.id"), index=True)
    organization_id: Mapped[str] = mapped_column(String(64))
    last_updated: Mapped[datetime] = mapped_column(UtcDateTime())
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    ciphertext_sha256: Mapped[str] = mapped_column(String(64))
    client_id: Mapped[str] = mapped_column(String(64))
    # Blind token of this version's sensitivity-label set, matched against disclosure grants:
    # consent decides on the version served. NULL (written before labels were per version)
    # matches no grant.
    labels_token: Mapped[bytes | None] = mapped_column(LargeBinary(32))

    __table_args__ = (
        # Covering (migration 0010_h_bench): what the visibility predicate reads of a version, in
        # the grants' order, so that counting what an authority may see is one merge pass that
        # never visits the ciphertext rows.
        Index(
            "ix_resource_versions_grant_check",
            "resource_type",
            "subject_id",
            "labels_token",
            "id",
            "version_id",
        ),
    )


class SearchToken(Base):
    """Blind-indexed search values (identifiers, codes) of current versions: HMACs, never values."""

    __tablename__ = "search_tokens"

    resource_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    param: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)

    __table_args__ = (Index("ix_search_tokens_lookup", "resource_type", "param", "value"),)


class MatchKey(Base):
    """One row per (clinic, type, identifier blind index): makes ``ifNoneExist`` safe under
    concurrency. The holder is the resource created with that identifier."""

    __tablename__ = "match_keys"

    organization_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    resource_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    identifier_hash: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    resource_id: Mapped[str] = mapped_column(String(64))


class IdempotentRequest(Base):
    """What a write answered, so that its retry gets the same answer (service.records.idempotency).

    Keyed by a client's ``Idempotency-Key`` (scope ``client:<id>``, expires) or a transaction's
    ``Bundle.identifier`` (scope ``organization:<id>``, never expires); both keys and the request
    are HMACs under the index key. ``outcome`` holds status lines and references (type, id,
    version) only: no resource content, which a replay re-reads from the encrypted versions."""

    __tablename__ = "idempotent_requests"

    scope: Mapped[str] = mapped_column(String(80), primary_key=True)
    key_hash: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    request_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    # NULL while the claiming transaction runs (never visible to another one once committed).
    outcome: Mapped[dict[str, object] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # The blind-index key both hashes are under (NULL: before it was recorded). They cannot be
    # recomputed under a new key (the raw key is not stored): an index rotation waits them out.
    index_key_id: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (Index("ix_idempotent_requests_expires_at", "expires_at"),)


# --- audit trail (service/audit) -------------------------------------------------
# SQLite only aliases the rowid for a column declared exactly INTEGER PRIMARY KEY.
_AUDIT_ID = BigInteger().with_variant(Integer(), "sqlite")


class AuditEntry(Base):
    """One audit entry: canonical content bytes (what the Merkle leaf hashes) plus
    copies of a few fields as columns so that auditors can search. No PHI."""

    __tablename__ = "audit_entries"

    # Insertion order only: ids can commit out of order, the leaf index is the log order.
    id: Mapped[int] = mapped_column(_AUDIT_ID, primary_key=True, autoincrement=True)
    recorded_at: Mapped[datetime] = mapped_column(UtcDateTime())
    event_type: Mapped[str] = mapped_column(String(16))
    subtype: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(1))
    outcome: Mapped[str] = mapped_column(String(2))
    client_id: Mapped[str | None] = mapped_column(String(64))
    content: Mapped[bytes] = mapped_column(LargeBinary)
    # Set by the integrator when it appends the entry to the tree; NULL until then.
    leaf_index: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    leaf_hash: Mapped[bytes | None] = mapped_column(LargeBinary(32))

    __table_args__ = (
        Index("ix_audit_entries_recorded_at", "recorded_at"),
        Index("ix_audit_entries_client_recorded", "client_id", "recorded_at"),
        # The integrator's "what is left to seal" scan stays small as the log grows.
        Index(
            "ix_audit_entries_unsealed",
            "id",
            postgresql_where=text("leaf_index IS NULL"),
            sqlite_where=text("leaf_index IS NULL"),
        ),
    )


class AuditRef(Base):
    """Search keys of an entry (patient pseudonym, entity Type/id, recipient organization)."""

    __tablename__ = "audit_refs"

    entry_id: Mapped[int] = mapped_column(ForeignKey("audit_entries.id"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    value: Mapped[str] = mapped_column(String(200), primary_key=True)

    __table_args__ = (Index("ix_audit_refs_lookup", "kind", "value", "entry_id"),)


class AuditNode(Base):
    """A perfect subtree hash of the audit Merkle tree, (level, index); insert-only."""

    __tablename__ = "audit_nodes"

    level: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_index: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    hash: Mapped[bytes] = mapped_column(LargeBinary(32))


class AuditCheckpoint(Base):
    """A signed checkpoint (C2SP signed note) of the tree at ``size`` leaves."""

    __tablename__ = "audit_checkpoints"

    size: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    root_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    note: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


_LIVE_AND_ADMITTING = "current_matches > 0 AND retired_at IS NULL"


class DisclosureGrant(Base):
    """When an authority may receive which kind of a migrant's resources, for which purpose.

    Materialised from the migrant's Consents by ``security.consent_grants`` (which
    calls the one decision function) whenever a Consent changes, so that searches
    filter in SQL before paging. Reveals which organizations may receive a
    pseudonymous migrant's data, and when; see SECURITY.md.
    """

    __tablename__ = "disclosure_grants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    subject_id: Mapped[str] = mapped_column(ForeignKey("subjects.id"))
    organization_id: Mapped[str] = mapped_column(String(64))
    purpose: Mapped[str] = mapped_column(String(32))
    resource_type: Mapped[str] = mapped_column(String(64))
    labels_token: Mapped[bytes] = mapped_column(LargeBinary(32))
    valid_from: Mapped[datetime | None] = mapped_column(UtcDateTime())
    valid_to: Mapped[datetime | None] = mapped_column(UtcDateTime())
    rule: Mapped[str] = mapped_column(String(64))
    consent_id: Mapped[str] = mapped_column(String(64))
    consent_version: Mapped[int] = mapped_column(Integer)
    # How many current resources this grant would admit while in force: the migrant's current
    # versions of this type with exactly this label set (migration 0011_h_read_perf). Kept in
    # the transaction of every change to either side (RecordRepository.refresh_grant_matches),
    # and summed per organization, purpose and type in grant_totals (service.records.kept_totals),
    # so that an authority's search total is neither a join of every resource with the grants
    # nor a scan of its grants.
    current_matches: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Set by the sweep once the grant has ended: its count has left the kept totals
    # (service.records.kept_totals, migration 0012_h_kept_totals). Time only moves forward, so a
    # retired grant admits nothing ever again.
    retired_at: Mapped[datetime | None] = mapped_column(UtcDateTime())

    __table_args__ = (
        # Covering (migration 0010_h_bench): every column the visibility predicate compares.
        Index(
            "ix_disclosure_grants_match",
            "organization_id",
            "purpose",
            "resource_type",
            "subject_id",
            "labels_token",
            "valid_from",
            "valid_to",
        ),
        Index("ix_disclosure_grants_subject", "subject_id"),
        # Covering, over only the live grants that admit something (migration 0012_h_kept_totals):
        # the kept total's grants not yet begun, and those ended but not yet retired.
        Index(
            "ix_disclosure_grants_matches",
            "organization_id",
            "purpose",
            "resource_type",
            "valid_from",
            "valid_to",
            "current_matches",
            postgresql_where=text(_LIVE_AND_ADMITTING),
            sqlite_where=text(_LIVE_AND_ADMITTING),
        ),
        Index(
            "ix_disclosure_grants_ending",
            "organization_id",
            "purpose",
            "resource_type",
            "valid_to",
            "current_matches",
            postgresql_where=text(_LIVE_AND_ADMITTING),
            sqlite_where=text(_LIVE_AND_ADMITTING),
        ),
    )


class GrantTotal(Base):
    """Additions to the live sum of ``current_matches`` per (organization, purpose, type).

    Every transaction that changes a grant's count inserts its change here, and the background
    work folds them into one row per key (service.records.kept_totals). No personal data: an
    organization, a purpose, a type and a count.
    """

    __tablename__ = "grant_totals"

    id: Mapped[int] = mapped_column(_AUDIT_ID, primary_key=True, autoincrement=True)
    organization_id: Mapped[str] = mapped_column(String(64))
    purpose: Mapped[str] = mapped_column(String(32))
    resource_type: Mapped[str] = mapped_column(String(64))
    delta: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (
        # Covering: a total sums its key's rows from the index alone.
        Index("ix_grant_totals_key", "organization_id", "purpose", "resource_type", "delta"),
    )


class KeyCheck(Base):
    """Which keys the data in this database was written under: ids and check values only.

    A key check value is a 64-bit MAC of a fixed message under the key (see
    ``security.keys.KeyCheck``): it tells one key from another and reveals
    nothing usable about either. At start-up a keyring that lacks a recorded key,
    or holds a different one under its id, is refused.
    """

    __tablename__ = "key_checks"

    purpose: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(300), primary_key=True)
    check_value: Mapped[str] = mapped_column(String(64))
    recorded_at: Mapped[datetime] = mapped_column(UtcDateTime())


class AuditQuarantine(Base):
    """An audit row the integrator moved aside: it claimed a leaf at or past the signed tree
    size, which no sealed entry can have (leaves and their checkpoint commit together).

    Kept, bytes and all, for the investigation; `mhr audit verify` reports every row here.
    """

    __tablename__ = "audit_quarantine"

    entry_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    leaf_index: Mapped[int | None] = mapped_column(BigInteger)
    leaf_hash: Mapped[bytes | None] = mapped_column(LargeBinary(32))
    content: Mapped[bytes] = mapped_column(LargeBinary)
    tree_size: Mapped[int] = mapped_column(BigInteger)  # the signed size when it was found
    found_at: Mapped[datetime] = mapped_column(UtcDateTime())


class Job(Base):
    """Durable background work (service.jobs): written in the transaction of the change that
    causes it, leased by workers, retried, and kept as ``dead`` with its reason when it gives up.

    The payload carries pseudonymous ids only, never PHI (service.jobs says why); error columns
    hold an exception type and a message written for operators, never an exception's own text.
    """

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(64))
    # Unique per kind: enqueuing the same key twice is one job; the handler sees it too.
    idempotency_key: Mapped[str] = mapped_column(String(200))
    payload: Mapped[dict[str, object]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))  # queued, running, done, dead
    attempts: Mapped[int] = mapped_column(Integer)
    run_after: Mapped[datetime] = mapped_column(UtcDateTime())
    # The lease: who holds the job, until when, and the token that fences its completion.
    leased_until: Mapped[datetime | None] = mapped_column(UtcDateTime())
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_token: Mapped[str | None] = mapped_column(String(32))
    error_type: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())

    __table_args__ = (
        UniqueConstraint("kind", "idempotency_key"),
        Index("ix_jobs_due", "state", "run_after"),
    )


class KeyRotation(Base):
    """When each access-token and audit log key came into use and left it; never key material.

    A token key may be retired only once every token signed under it has
    expired (``superseded_at`` + token lifetime). An audit log key row carries
    its verifier key and the checkpoint sizes it may sign (``first_size`` to
    ``last_size``, open-ended for the current key): a checkpoint outside its
    key's range is refused by ``mhr audit verify``, so a leaked old key cannot
    sign new checkpoints.
    """

    __tablename__ = "key_rotations"

    purpose: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(300), primary_key=True)
    active_from: Mapped[datetime] = mapped_column(UtcDateTime())
    superseded_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    retired_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    vkey: Mapped[str | None] = mapped_column(Text, nullable=True)
    first_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class ErasureRequest(Base):
    """A request to erase one migrant (GDPR Art. 17): asked by one admin, approved by another.

    ``organization_id`` is the clinic that submitted the migrant's record: the one that may
    fetch the signed ``receipt`` once the erasure is done. Pseudonymous ids only.
    """

    __tablename__ = "erasure_requests"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    subject_id: Mapped[str] = mapped_column(ForeignKey("subjects.id"), index=True)
    organization_id: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))  # requested, erased, cancelled
    requested_by: Mapped[str] = mapped_column(String(64))
    requested_by_person: Mapped[str | None] = mapped_column(String(200))
    requested_at: Mapped[datetime] = mapped_column(UtcDateTime())
    approved_by: Mapped[str | None] = mapped_column(String(64))
    approved_by_person: Mapped[str | None] = mapped_column(String(200))
    approved_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # The C2SP signed note handed to the clinic (signed with the audit checkpoint key).
    receipt: Mapped[str | None] = mapped_column(Text)


class RetentionHold(Base):
    """A statutory retention obligation set by an admin: while in force, erasure is refused."""

    __tablename__ = "retention_holds"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    subject_id: Mapped[str] = mapped_column(ForeignKey("subjects.id"), index=True)
    legal_basis: Mapped[str] = mapped_column(String(200))
    set_by: Mapped[str] = mapped_column(String(64))
    set_at: Mapped[datetime] = mapped_column(UtcDateTime())
    released_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


# --- Bulk Data export (service.bulk) -------------------------------------------------------------


class BulkExport(Base):
    """One $export kick-off: who asked, what for, and where the background job has got to.

    Pseudonymous ids and parameters only (the kick-off's ``_type``, ``_since``, ``_until`` and
    the Group id are not PHI). ``wrapped_key`` is the export's file key wrapped by the key
    provider (never in clear); ``cursor_subject`` is the checkpoint: the last migrant (subject
    pseudonym) whose resources are written, so that a restarted job resumes after it.
    """

    __tablename__ = "bulk_exports"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(64), index=True)
    organization_id: Mapped[str] = mapped_column(String(64))
    purpose: Mapped[str] = mapped_column(String(64))
    group_id: Mapped[str | None] = mapped_column(String(64))
    types: Mapped[list[str]] = mapped_column(JSON)
    since: Mapped[datetime | None] = mapped_column(UtcDateTime())
    until: Mapped[datetime] = mapped_column(UtcDateTime())
    request_url: Mapped[str] = mapped_column(Text)
    # queued, running, complete, failed, cancelled, expired
    state: Mapped[str] = mapped_column(String(16))
    wrapped_key: Mapped[bytes | None] = mapped_column(LargeBinary)
    cursor_subject: Mapped[str | None] = mapped_column(String(64))
    subjects_done: Mapped[int] = mapped_column(Integer)
    resources_done: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    error: Mapped[str | None] = mapped_column(String(300))


class BulkExportFile(Base):
    """One output file of an export (one per resource type): how much of it is committed.

    ``byte_length`` and ``records`` are the checkpoint of the file: bytes beyond them were
    written by an attempt that did not commit and are cut off before the next append.
    """

    __tablename__ = "bulk_export_files"

    export_id: Mapped[str] = mapped_column(ForeignKey("bulk_exports.id"), primary_key=True)
    resource_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    byte_length: Mapped[int] = mapped_column(BigInteger)
    records: Mapped[int] = mapped_column(Integer)
    resources: Mapped[int] = mapped_column(BigInteger)


# --- follow-up tasks (service/tasks) ----------------------------------------------
# What the worklist, the overdue job and the completion figures need in clear; the Task
# resource itself (and the outcome QuestionnaireResponse) is encrypted under the subject key.


class FollowupTask(Base):
    """One follow-up case: an exam needing follow-up, disclosed to one receiving authority.

    ``id`` is the Task resource id. ``focus_id`` (the classification Observation) and
    ``origin_org`` (the authority first assigned) make creation idempotent per exam and
    authority. ``outcome`` compares the receiving country's evaluation with the overseas
    classification: ``confirmed`` or ``revised``; NULL means not evaluated. No clinical value
    (class, diagnosis, results) is kept in clear.
    """

    __tablename__ = "followup_tasks"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    subject_id: Mapped[str] = mapped_column(ForeignKey("subjects.id"), index=True)
    focus_id: Mapped[str] = mapped_column(String(64))
    origin_org: Mapped[str] = mapped_column(String(64))
    owner_org: Mapped[str] = mapped_column(String(64))
    requester_org: Mapped[str] = mapped_column(String(64), index=True)
    code: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))  # FHIR Task.status
    business_status: Mapped[str | None] = mapped_column(String(32))
    authored_at: Mapped[datetime] = mapped_column(UtcDateTime())
    arrival_date: Mapped[date | None] = mapped_column(Date)
    due_date: Mapped[date] = mapped_column(Date)
    evaluated_on: Mapped[date | None] = mapped_column(Date)
    closed_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    outcome: Mapped[str | None] = mapped_column(String(16))
    # The outcome QuestionnaireResponse id, once reported.
    outcome_response_id: Mapped[str | None] = mapped_column(String(64))
    # The authority shares the worksheet with the examining clinic (its answer in the worksheet).
    outcome_shared: Mapped[bool] = mapped_column(Boolean, default=False)
    # When the overdue job raised this task's current due date (NULL: not yet, or re-dated).
    overdue_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())

    __table_args__ = (
        UniqueConstraint("focus_id", "origin_org"),
        Index("ix_followup_tasks_owner_status_due", "owner_org", "status", "due_date"),
        Index("ix_followup_tasks_status_due", "status", "due_date"),
    )


class FollowupTransfer(Base):
    """A custody change of a follow-up task from one authority to another."""

    __tablename__ = "followup_transfers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("followup_tasks.id"), index=True)
    from_org: Mapped[str] = mapped_column(String(64))
    to_org: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(UtcDateTime())


# --- subscriptions (service/subscriptions; FHIR Subscriptions R5 Backport IG 1.1.0 for R4) --------
class SubscriptionRow(Base):
    """An authority's Subscription, as columns: the FHIR resource is rendered from them.

    No PHI: a topic canonical, an endpoint of the authority's own, the authority's reason text.
    ``headers_sealed`` holds the channel headers (often a bearer secret) encrypted under the
    service's subscription header key; they are never answered back.
    """

    __tablename__ = "subscriptions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    # The purpose of use of the token that wrote it: the grants its record events are checked with.
    purpose: Mapped[str] = mapped_column(String(32))
    topic: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))  # requested, active, error, off
    reason: Mapped[str] = mapped_column(String(1000))
    endpoint: Mapped[str] = mapped_column(Text)
    payload_type: Mapped[str] = mapped_column(String(64))  # the channel's MIME type
    payload_content: Mapped[str] = mapped_column(String(16))  # id-only or empty
    headers_sealed: Mapped[bytes | None] = mapped_column(LargeBinary)
    heartbeat_seconds: Mapped[int | None] = mapped_column(Integer)
    timeout_seconds: Mapped[int | None] = mapped_column(Integer)
    max_count: Mapped[int | None] = mapped_column(Integer)
    end_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # The last event number issued (the IG's eventsSinceSubscriptionStart); bumped under a row
    # lock by the transaction that writes the event, so numbers are gap-free and ordered.
    events_issued: Mapped[int] = mapped_column(BigInteger)
    # The last event number the delivery worker handed over (0: none yet).
    events_delivered: Mapped[int] = mapped_column(BigInteger)
    # Set by delivery when the status becomes error: an operator-facing text, no PHI.
    error: Mapped[str | None] = mapped_column(String(300))
    version_id: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    last_updated: Mapped[datetime] = mapped_column(UtcDateTime())

    __table_args__ = (Index("ix_subscriptions_org_topic", "organization_id", "topic", "status"),)


class SubscriptionEvent(Base):
    """One event of one subscription, numbered from 1 per subscription (the IG's eventNumber).

    Ids only: the focus (type, id, version) and the migrant's pseudonymous id, with which the
    consent is decided again when the event is delivered or fetched through ``$events``.
    """

    __tablename__ = "subscription_events"

    subscription_id: Mapped[str] = mapped_column(
        ForeignKey("subscriptions.id", ondelete="CASCADE"), primary_key=True
    )
    event_number: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    occurred_at: Mapped[datetime] = mapped_column(UtcDateTime())
    focus_type: Mapped[str] = mapped_column(String(64))
    focus_id: Mapped[str] = mapped_column(String(64))
    focus_version: Mapped[int | None] = mapped_column(Integer)
    subject_id: Mapped[str | None] = mapped_column(String(64))


# --- subscription delivery (service.subscriptions.delivery) ------------------------------------


class SubscriptionDeliveryState(Base):
    """Where delivery of one subscription stands, besides its cursor (``events_delivered``).

    ``failing_since`` is the first failed attempt of the current run of failures: retries go on
    until MHR_SUBSCRIPTION_RETRY_HOURS after it, then the subscription is ``error``. No endpoint,
    no header and no PHI here.
    """

    __tablename__ = "subscription_delivery_state"

    subscription_id: Mapped[str] = mapped_column(
        ForeignKey("subscriptions.id", ondelete="CASCADE"), primary_key=True
    )
    failing_since: Mapped[datetime | None] = mapped_column(UtcDateTime())
    failures: Mapped[int] = mapped_column(Integer, default=0)
    # No attempt before this (the backoff); a job that runs earlier leaves the work to the retry.
    retry_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # The last notification of any type the receiver accepted: heartbeats count from it.
    last_sent_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # The outcome of the last attempt, a fixed code ("delivered", "http-503", "unreachable" ...).
    last_outcome: Mapped[str | None] = mapped_column(String(32))
    # Which delivery job is sending now, and until when that holds: a notification is POSTed with
    # no transaction open, so one sender at a time (in order) is this claim, not a row lock. A
    # claim past ``claimed_until`` (its worker died) may be taken over; the same job, leased again
    # after a crash, takes its own claim back at once.
    claim_job_id: Mapped[int | None] = mapped_column(BigInteger)
    claim_token: Mapped[str | None] = mapped_column(String(32))
    claimed_until: Mapped[datetime | None] = mapped_column(UtcDateTime())


# --- blind-index key rotation (service.keys.index_rotation) ------------------------------------


class IndexKeyState(Base):
    """Which blind-index keys are in use (one row, id 1; none before the first rotation).

    ``current_kid`` indexes every new migrant and every query; while ``previous_kid`` is set a
    rotation is under way: migrants still under it are moved by ``keys.reindex`` jobs, and every
    lookup computes its tokens under both keys. Key ids only, never key material.
    """

    __tablename__ = "index_key_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    current_kid: Mapped[str] = mapped_column(String(64))
    previous_kid: Mapped[str | None] = mapped_column(String(64))
    changed_at: Mapped[datetime] = mapped_column(UtcDateTime())

"""Intake: a clinic's transaction Bundle (or a single create/update) stored whole or not at all.

Steps, all inside the request's one transaction:
validate (R4B + profiles) -> plan ids and resolve ``ifNoneExist`` -> check and
rewrite references -> find each resource's migrant -> encrypt each version
under that migrant's key -> write versions, current pointers, blind indexes and
a Provenance per migrant -> answer with a transaction-response.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import parse_qsl

import orjson

from security.blind_index import BlindIndexer
from security.envelope import SubjectCipher, ciphertext_digest, resource_aad
from security.keys import KekRetired
from service.audit.events import Action, AuditAgent, AuditEntity, AuditRecord, EventType, Outcome
from service.domain.errors import (
    DomainError,
    Invalid,
    NotFound,
    NotSupported,
    PreconditionFailed,
    Problem,
    TooCostly,
    Unprocessable,
)
from service.fhir_validation import Issue
from service.identity.repository import IdentityRepository
from service.records.codec import erased, retired_key_outcome
from service.records.consents import refresh_grants
from service.records.context import Actor, RecordServices
from service.records.idempotency import Idempotency, Remembered, RememberedEntry, exam_key
from service.records.idempotency_repository import IdempotencyRepository
from service.records.indexing import index_resource, labels_token
from service.records.references import iter_references, parse_relative, rewrite_references, subject_reference
from service.records.repository import RecordRepository, WriteBatch
from service.records.resource_types import IDENTIFIED_TYPES, SERVICE_WRITTEN_TYPES, STORED_TYPES
from service.records.subject_keys import SUBJECT_KEY_VERSION, OpenedKeys, SubjectErased, kek_version_of
from service.records.write_observers import CommittedWrite, Written, new_observers
from service.store.tables import StoredResource, Subject

log = logging.getLogger(__name__)

CLIENT_ID_SYSTEM = "https://mhr.example.org/fhir/sid/client"
PERSON_ID_SYSTEM = "https://mhr.example.org/fhir/sid/person"
PROVENANCE_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
MAX_ENTRIES = 500


class PatientRaceLost(Exception):
    """Another transaction claimed the same ``ifNoneExist`` identifier first; the caller retries once.

    Raised before the intake has written anything (its own claims are taken back), so the
    caller retries in the same transaction without a SAVEPOINT.
    """


# Types whose create (If-None-Exist, or ifNoneExist in a transaction entry) may be conditional:
# every type with an identifier; the CapabilityStatement's conditionalCreate is tested against this.
CONDITIONAL_CREATE_TYPES: Final = IDENTIFIED_TYPES


def validation_error(issues: list[Issue]) -> DomainError:
    errors = [i for i in issues if i.severity in ("error", "fatal")]
    # FHIR REST: 400 when the resource fails basic FHIR rules, 422 when valid FHIR breaks a profile.
    kind = Invalid if any(i.basic for i in errors) else Unprocessable
    return kind.of([Problem(i.diagnostics, i.expression, i.code, i.severity) for i in errors])


def _invalid(
    diagnostics: str, expression: str, code: str = "invalid", kind: type[DomainError] = Invalid
) -> DomainError:
    return kind(diagnostics, expression=expression, code=code)


def refuse_service_written(resource_type: Any) -> None:
    """A create or update of a type only the service writes: that interaction does not exist."""
    if isinstance(resource_type, str) and resource_type in SERVICE_WRITTEN_TYPES:
        raise NotSupported(
            f"{resource_type} is written by the service for every write; clients read it",
            allowed=("GET",),
        )


@dataclass
class _Planned:
    index: int
    resource: dict[str, Any]
    resource_type: str
    resource_id: str
    method: str  # "create" | "update" | "existing"
    current: StoredResource | None = None
    subject_id: str | None = None
    # The ifNoneExist identifier's blind index: claimed on create, so that two
    # concurrent submissions of the same migrant cannot both create one.
    match_key: bytes | None = None


@dataclass
class WrittenVersion:
    resource_type: str
    resource_id: str
    version_id: int
    last_updated: datetime
    ciphertext_sha256: str
    subject_id: str
    created: bool
    body: bytes = b""
    # The transaction-response entry's status line.
    status: str = "200 OK"

    def remembered(self) -> RememberedEntry:
        at = self.last_updated.isoformat().replace("+00:00", "Z")
        return RememberedEntry(
            self.resource_type, self.resource_id, self.version_id, self.subject_id, self.status, at
        )


@dataclass
class IntakeResult:
    written: list[WrittenVersion] = field(default_factory=list)
    by_entry: list[WrittenVersion] = field(default_factory=list)
    # True when this answers a retry from what the first attempt stored: nothing was written.
    replayed: bool = False

    def remembered(self, status: int) -> Remembered:
        return Remembered(status, tuple(w.remembered() for w in self.by_entry))

    @classmethod
    def replay(cls, remembered: Remembered) -> IntakeResult:
        entries = [
            WrittenVersion(
                e.resource_type,
                e.resource_id,
                e.version_id,
                datetime.fromisoformat(e.last_updated.replace("Z", "+00:00")),
                "",
                e.subject_id,
                created=e.status.startswith("201"),
                status=e.status,
            )
            for e in remembered.entries
        ]
        return cls(by_entry=entries, replayed=True)

    def audit_entities(self) -> tuple[AuditEntity, ...]:
        return tuple(
            AuditEntity(w.resource_type, w.resource_id, w.version_id, w.ciphertext_sha256 or None)
            for w in (self.by_entry if self.replayed else self.written)
        )

    def patient_ids(self) -> tuple[str, ...]:
        return tuple(sorted({w.subject_id for w in self.written or self.by_entry}))

    def transaction_record(self, actor: Actor, *, detail: str) -> AuditRecord:
        """The audit entry of a transaction submitted in-process (demo seed, bulk load), as the
        API writes for ``POST /fhir``."""
        return AuditRecord(
            event_type=EventType.rest,
            subtype="transaction",
            action=Action.create,
            outcome=Outcome.success,
            agent=AuditAgent(actor.client_id, actor.organization_id, actor.role, actor.person),
            entities=self.audit_entities(),
            patient_ids=self.patient_ids(),
            detail=detail,
        )


class Intake:
    def __init__(
        self,
        services: RecordServices,
        repo: RecordRepository,
        identities: IdentityRepository,
        keys: OpenedKeys | None = None,
    ) -> None:
        self.services = services
        self.repo = repo
        self.identities = identities
        # The request's subject keys (each unwrapped once); by migrant, the cipher this intake seals with.
        self.keys = keys or services.keys.opened()
        self._ciphers: dict[str, SubjectCipher] = {}
        # Each migrant's blind indexer: their tokens are all under one key (index_keys).
        self._indexers: dict[str, BlindIndexer] = {}
        # Key rows of migrants already in the store, read with the references that name them.
        self._subjects: dict[str, Subject | None] = {}
        # Current pointers of resources referenced from outside the submission.
        self._referenced: dict[tuple[str, str], StoredResource] = {}
        self._batch = WriteBatch()
        self.idempotency = Idempotency(IdempotencyRepository(repo.session))

    # --- entry points -------------------------------------------------------------
    async def transaction(self, bundle: Any, actor: Actor) -> IntakeResult:
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise _invalid("expected a Bundle resource", "Bundle", "structure")
        if bundle.get("type") != "transaction":
            raise _invalid("only transaction Bundles are accepted here", "Bundle.type", "not-supported")
        entries = bundle.get("entry")
        if not isinstance(entries, list) or not entries:
            raise _invalid("a transaction needs at least one entry", "Bundle.entry", "required")
        if len(entries) > MAX_ENTRIES:
            raise _invalid(
                f"at most {MAX_ENTRIES} entries per transaction", "Bundle.entry", "too-costly", TooCostly
            )
        for index, entry in enumerate(entries):
            resource = entry.get("resource") if isinstance(entry, dict) else None
            rtype = resource.get("resourceType") if isinstance(resource, dict) else None
            if isinstance(rtype, str) and rtype in SERVICE_WRITTEN_TYPES:
                raise _invalid(
                    f"{rtype} is written by the service for every write; a client cannot submit one",
                    f"Bundle.entry[{index}].resource",
                    "business-rule",
                    Unprocessable,
                )
        # A resubmitted exam (same Bundle.identifier) is answered from its first submission.
        key = exam_key(self.services.index_keys.live, actor.organization_id, bundle)
        if key is not None:
            remembered = await self.idempotency.claim(key, datetime.now(UTC))
            if remembered is not None:
                return IntakeResult.replay(remembered)
        issues = await self.services.offload.run(lambda: self.services.validator.validate_bundle(bundle))
        if any(i.severity in ("error", "fatal") for i in issues):
            raise validation_error(issues)
        planned, aliases = await self._plan(entries, actor)
        result = await self._commit(planned, aliases, actor)
        if key is not None:
            await self.idempotency.settle(key, result.remembered(200))
        return result

    async def create(self, resource: Any, actor: Actor, if_none_exist: str | None = None) -> IntakeResult:
        refuse_service_written(resource.get("resourceType") if isinstance(resource, dict) else None)
        entry: dict[str, Any] = {
            "resource": resource,
            "request": {
                "method": "POST",
                "url": resource.get("resourceType") if isinstance(resource, dict) else "",
            },
        }
        if if_none_exist:
            entry["request"]["ifNoneExist"] = if_none_exist
        return await self._single(resource, entry, actor)

    async def update(
        self, resource_type: str, resource_id: str, resource: Any, actor: Actor, if_match: str | None = None
    ) -> IntakeResult:
        refuse_service_written(resource_type)
        if not isinstance(resource, dict) or resource.get("resourceType") != resource_type:
            raise _invalid("the body's resourceType must match the URL", "resourceType")
        if resource.get("id") != resource_id:
            raise _invalid("the body's id must match the URL", f"{resource_type}.id")
        entry = {"resource": resource, "request": {"method": "PUT", "url": f"{resource_type}/{resource_id}"}}
        result = await self._single(resource, entry, actor, if_match=if_match)
        return result

    async def _single(
        self, resource: Any, entry: dict[str, Any], actor: Actor, if_match: str | None = None
    ) -> IntakeResult:
        if not isinstance(resource, dict):
            raise _invalid("expected a FHIR resource", "$this", "structure")
        issues = await self.services.offload.run(lambda: self.services.validator.validate(resource))
        if any(i.severity in ("error", "fatal") for i in issues):
            raise validation_error(issues)
        planned, aliases = await self._plan([entry], actor, root="", if_match=if_match)
        return await self._commit(planned, aliases, actor)

    # --- planning -------------------------------------------------------------------
    async def _plan(
        self, entries: list[Any], actor: Actor, *, root: str = "Bundle.entry", if_match: str | None = None
    ) -> tuple[list[_Planned], dict[str, str]]:
        aliases: dict[str, str] = {}  # fullUrl -> "Type/id"
        planned: list[_Planned] = []
        # Work on copies: references are rewritten in place, and a retried transaction must
        # start again from what the client sent. Made off the event loop, as the walks over
        # them below are: for a body near the work limits each takes tens of milliseconds.
        sent = [entry.get("resource") if isinstance(entry, dict) else None for entry in entries]
        copies = await self.services.offload.run(lambda: orjson.loads(orjson.dumps(sent)))
        for index, entry in enumerate(entries):
            where = f"{root}[{index}]" if root else ""
            resource = copies[index]
            if not isinstance(resource, dict):
                raise _invalid("entry has no resource", f"{where}.resource".lstrip("."), "required")
            rtype = resource.get("resourceType")
            if rtype not in STORED_TYPES:
                raise _invalid(
                    "this resource type is not stored by this server",
                    f"{where}.resource".lstrip("."),
                    "not-supported",
                )
            request = entry.get("request") if isinstance(entry.get("request"), dict) else {}
            method = request.get("method")
            full_url = entry.get("fullUrl")
            if method == "POST":
                if request.get("url") != rtype:
                    raise _invalid(
                        "request.url must be the resource type", f"{where}.request.url".lstrip(".")
                    )
                item = _Planned(index, resource, rtype, str(uuid.uuid4()), "create")
                if_none_exist = request.get("ifNoneExist")
                if if_none_exist:
                    existing, item.match_key = await self._if_none_exist(rtype, if_none_exist, actor, where)
                    if existing is not None:
                        item.resource_id, item.method = existing, "existing"
            elif method == "PUT":
                target = parse_relative(str(request.get("url", "")))
                if target is None or target[0] != rtype or resource.get("id") != target[1]:
                    raise _invalid(
                        "PUT needs url Type/id matching the resource", f"{where}.request.url".lstrip(".")
                    )
                current = await self.repo.current_for_update(rtype, target[1])
                if current is None or current.organization_id != actor.organization_id:
                    # Unknown and someone else's look the same.
                    raise NotFound(f"{rtype} not found", expression=where or None)
                # A transaction entry carries its own (request.ifMatch), as a PUT its header.
                expected = if_match if if_match is not None else request.get("ifMatch")
                if expected is not None and (
                    not isinstance(expected, str)
                    or expected.strip() not in (f'W/"{current.version_id}"', f'"{current.version_id}"')
                ):
                    raise PreconditionFailed(
                        "If-Match does not name the current version",
                        expression=f"{where}.request.ifMatch" if where else None,
                    )
                item = _Planned(index, resource, rtype, target[1], "update", current=current)
                item.subject_id = current.subject_id
            else:
                raise _invalid(
                    "request.method must be POST or PUT (corrections are new versions)",
                    f"{where}.request.method".lstrip("."),
                    "not-supported",
                )
            if isinstance(full_url, str) and full_url:
                if full_url in aliases:
                    raise _invalid("duplicate fullUrl", f"{where}.fullUrl".lstrip("."))
                aliases[full_url] = f"{rtype}/{item.resource_id}"
            planned.append(item)
        seen = [f"{p.resource_type}/{p.resource_id}" for p in planned if p.method == "update"]
        if len(seen) != len(set(seen)):
            raise _invalid("a resource is updated twice in one transaction", root or "$this")
        await self._resolve_references(planned, aliases, actor, root)
        await self._resolve_subjects(planned, actor, root)
        return planned, aliases

    async def _if_none_exist(
        self, rtype: str, query: str, actor: Actor, where: str
    ) -> tuple[str | None, bytes]:
        """The clinic's existing resource of this type with this identifier (None if none), and the
        identifier's index."""
        expression = f"{where}.request.ifNoneExist".lstrip(".")
        if rtype not in CONDITIONAL_CREATE_TYPES:
            raise _invalid(
                f"{rtype} has no identifier: retry its create with an Idempotency-Key instead",
                expression,
                "not-supported",
            )
        params = parse_qsl(query, keep_blank_values=True)
        if len(params) != 1 or params[0][0] != "identifier" or "|" not in params[0][1]:
            raise _invalid("ifNoneExist supports identifier=system|value", expression, "not-supported")
        system, _, value = params[0][1].partition("|")
        try:
            # Under every index key in use (a rotation): the holder may be under either.
            tokens = [indexer.identifier(system, value) for indexer in self.services.index_keys.live]
        except ValueError:
            raise _invalid("ifNoneExist identifier is empty", expression) from None
        token = tokens[0]  # claimed under the current key, as every concurrent claim is
        # Only this clinic's own resources: matching another clinic's would reveal that it exists.
        matches = await self.repo.resources_with_identifier(actor.organization_id, rtype, tokens)
        if len(matches) > 1:
            raise _invalid(
                "ifNoneExist matches more than one resource",
                expression,
                "multiple-matches",
                PreconditionFailed,
            )
        return (matches[0] if matches else None), token

    def _rewrite_references(
        self, planned: list[_Planned], aliases: dict[str, str], root: str
    ) -> dict[tuple[str, str], list[str]]:
        """Check every reference and point those to entries at their new ids; returns the
        references to resources outside the submission, with where each is named."""
        in_bundle = {f"{p.resource_type}/{p.resource_id}" for p in planned}
        external: dict[tuple[str, str], list[str]] = defaultdict(list)
        base = self.services.fhir_base_url + "/"
        for item in planned:
            where = f"{root}[{item.index}].resource" if root else item.resource_type
            for path, reference in iter_references(item.resource):
                expression = f"{where}.{path}"
                if reference.startswith("#"):
                    continue
                if reference.startswith(base):
                    reference = reference[len(base) :]
                if reference.startswith("urn:uuid:") or reference.startswith("urn:oid:"):
                    if reference not in aliases:
                        raise _invalid("reference to an entry that is not in the Bundle", expression)
                    continue
                target = parse_relative(reference)
                if target is None:
                    raise _invalid(
                        "references must be relative (Type/id), urn:uuid within the Bundle, "
                        "or logical (identifier)",
                        expression,
                    )
                if f"{target[0]}/{target[1]}" not in in_bundle:
                    external[target].append(expression)

        def replace(reference: str) -> str:
            if reference.startswith(base):
                reference = reference[len(base) :]
            return aliases.get(reference, reference)

        for item in planned:
            rewrite_references(item.resource, replace)
        return external

    async def _resolve_references(
        self, planned: list[_Planned], aliases: dict[str, str], actor: Actor, root: str
    ) -> None:
        external = await self.services.offload.run(lambda: self._rewrite_references(planned, aliases, root))
        if not external:
            return
        organizations = [k for k in external if k[0] == "Organization"]
        for key in organizations:
            if await self.identities.organization(key[1]) is None:
                raise _invalid("referenced Organization not found", external[key][0], "not-found")
        stored_refs = [k for k in external if k[0] != "Organization"]
        found = await self.repo.existing_with_subjects(stored_refs)
        for key in stored_refs:
            row, subject = found.get(key, (None, None))
            if key[0] not in STORED_TYPES or row is None or row.organization_id != actor.organization_id:
                raise _invalid("referenced resource not found", external[key][0], "not-found")
            self._referenced[key] = row
            self._subjects[row.subject_id] = subject

    async def _resolve_subjects(self, planned: list[_Planned], actor: Actor, root: str) -> None:
        patients_in_bundle = {p.resource_id for p in planned if p.resource_type == "Patient"}
        for item in planned:
            where = f"{root}[{item.index}].resource" if root else item.resource_type
            subject: str | None
            if item.resource_type == "Patient":
                subject = item.resource_id
            else:
                reference = subject_reference(item.resource)
                target = parse_relative(reference) if reference else None
                if target is None or target[0] != "Patient":
                    raise _invalid(
                        "the resource must reference its Patient", where, "required", Unprocessable
                    )
                subject = target[1]
                if subject not in patients_in_bundle:
                    row = self._referenced.get(("Patient", subject))
                    if row is None:
                        row = await self.repo.current("Patient", subject)
                    if row is None or row.organization_id != actor.organization_id:
                        raise _invalid("referenced resource not found", where, "not-found")
            if item.subject_id is not None and item.subject_id != subject:
                raise _invalid(
                    "a resource cannot move to another migrant", where, "business-rule", Unprocessable
                )
            item.subject_id = subject

    # --- writing --------------------------------------------------------------------
    async def _commit(self, planned: list[_Planned], aliases: dict[str, str], actor: Actor) -> IntakeResult:
        now = datetime.now(UTC)
        result = IntakeResult()
        new_patients = [p for p in planned if p.resource_type == "Patient" and p.method == "create"]
        # Only the identifier the client matched on is unique: family members can
        # share a case number, and a migrant may hold several passports. Claimed
        # before anything is written: a lost race leaves nothing behind to undo. (Two new
        # migrants of one transaction with the same key: the later one holds it, as before.)
        claims = {
            (p.resource_type, p.match_key): p.resource_id
            for p in planned
            if p.method == "create" and p.match_key is not None
        }
        if not await self.repo.claim_match_keys(actor.organization_id, claims):
            raise PatientRaceLost
        # Read once: the indexer of new migrants changes when a rotation settles, and a migrant's
        # row must name the key its tokens are made under.
        new_indexer = self.services.indexer
        for patient in new_patients:
            wrapped, cipher = self.keys.create(patient.resource_id)
            self._batch.subjects.append(
                {
                    "id": patient.resource_id,
                    "wrapped_key": wrapped,
                    "key_version": SUBJECT_KEY_VERSION,
                    "kek_version": kek_version_of(wrapped),
                    "created_at": now,
                    "erased_at": None,
                    "index_key_id": new_indexer.kid,
                }
            )
            self._ciphers[patient.resource_id] = cipher
            self._indexers[patient.resource_id] = new_indexer
        per_subject: dict[str, list[WrittenVersion]] = defaultdict(list)
        for item in planned:
            if item.method == "existing":
                existing = await self.repo.current(item.resource_type, item.resource_id)
                assert existing is not None
                written = WrittenVersion(
                    item.resource_type,
                    item.resource_id,
                    existing.version_id,
                    existing.last_updated,
                    "",
                    existing.subject_id,
                    created=False,
                    status="200 OK",
                )
                result.by_entry.append(written)
                continue
            written = await self._write(item, actor, now)
            result.written.append(written)
            result.by_entry.append(written)
            per_subject[written.subject_id].append(written)
        for subject_id, versions in per_subject.items():
            provenance = self._provenance(versions, actor, now)
            item = _Planned(-1, provenance, "Provenance", provenance["id"], "create", subject_id=subject_id)
            result.written.append(await self._write(item, actor, now))
        await self.repo.write_batch(self._batch)
        # A Consent written, corrected or withdrawn changes what authorities may
        # receive from the very next request: recompute that migrant's grants now.
        consents: dict[str, dict[str, tuple[int, bytes]]] = defaultdict(dict)
        for written in result.written:
            if written.resource_type == "Consent":
                consents[written.subject_id][written.resource_id] = (written.version_id, written.body)
        created = {p.resource_id for p in new_patients}
        # Features that follow a write in its transaction (subscription events, follow-up
        # tasks; service.records.write_observers) see the grants before and after.
        observers = new_observers()
        for observer in observers:
            await observer.before_grants(self.repo, frozenset(set(consents) - created), now)
        for subject_id, fresh in consents.items():
            await refresh_grants(
                self.services, self.repo, subject_id, fresh, keys=self.keys, new_subject=subject_id in created
            )
        write = CommittedWrite(
            services=self.services,
            repo=self.repo,
            keys=self.keys,
            written=[
                Written(w.resource_type, w.resource_id, w.version_id, w.subject_id) for w in result.written
            ],
            consent_versions={
                w.resource_id: w.version_id for w in result.written if w.resource_type == "Consent"
            },
            agent=AuditAgent(actor.client_id, actor.organization_id, actor.role, actor.person),
            at=now,
        )
        for observer in observers:
            await observer.after_grants(write)
        return result

    async def _cipher(self, subject_id: str) -> SubjectCipher:
        cipher = self._ciphers.get(subject_id)
        if cipher is None:
            if subject_id in self._subjects:
                subject = self._subjects[subject_id]
            else:
                subject = await self.repo.subject(subject_id)
            if subject is None:
                raise NotFound("Patient not found")
            try:
                cipher = self.keys.cipher(subject.id, subject.wrapped_key, subject.key_version)
            except SubjectErased:
                # Nothing is written for an erased migrant: a new exam starts a new record.
                raise erased("Patient") from None
            except KekRetired:
                log.error(
                    "write to a migrant under a retired KEK version",
                    extra={"event": "kek-retired", "subject_id": subject_id},
                )
                raise retired_key_outcome() from None
            self._ciphers[subject_id] = cipher
        return cipher

    async def _indexer(self, subject_id: str) -> BlindIndexer:
        indexer = self._indexers.get(subject_id)
        if indexer is None:
            # Read with a share lock: a migrant being moved to another index key (keys.reindex,
            # which locks the row for update) is written to before or after the move, not during.
            kid = await self.repo.subject_index_key(subject_id)
            indexer = self._indexers[subject_id] = self.services.index_keys.for_kid(kid)
        return indexer

    async def _write(self, item: _Planned, actor: Actor, now: datetime) -> WrittenVersion:
        assert item.subject_id is not None
        version_id = (item.current.version_id + 1) if item.current is not None else 1
        resource = dict(item.resource)
        resource["id"] = item.resource_id
        meta = dict(resource.get("meta") or {})
        meta["versionId"] = str(version_id)
        meta["lastUpdated"] = now.isoformat().replace("+00:00", "Z")
        # Declare the profiles it was validated against, so that a recipient's tools check the same.
        profiles = self.services.validator.applicable_profiles(resource)
        if profiles:
            meta["profile"] = list(dict.fromkeys([*meta.get("profile", []), *profiles]))
        resource["meta"] = meta
        # Labels go into meta.security before encryption, so they travel with the resource.
        labels = self.services.labeler.apply(resource)
        body = orjson.dumps(resource)
        cipher = await self._cipher(item.subject_id)
        blob = cipher.seal(
            body, resource_aad(item.resource_type, item.resource_id, version_id, item.subject_id)
        )
        digest = ciphertext_digest(blob)
        indexer = await self._indexer(item.subject_id)
        index = index_resource(indexer, resource)
        self._batch.add(
            {
                "resource_type": item.resource_type,
                "id": item.resource_id,
                "version_id": version_id,
                "subject_id": item.subject_id,
                "organization_id": actor.organization_id,
                "last_updated": now,
                "ciphertext": blob,
                "ciphertext_sha256": digest,
                "client_id": actor.client_id,
            },
            clinical_date=index.clinical_date,
            labels_token=labels_token(indexer, labels),
            tokens=index.tokens,
            current=item.current,
        )
        return WrittenVersion(
            item.resource_type,
            item.resource_id,
            version_id,
            now,
            digest,
            item.subject_id,
            created=item.current is None,
            body=body,
            status="201 Created" if item.current is None else "200 OK",
        )

    @staticmethod
    def _provenance(versions: list[WrittenVersion], actor: Actor, now: datetime) -> dict[str, Any]:
        """Who wrote these versions: the clinic, its client, and the person the client asserted."""
        updated = any(not v.created for v in versions)
        agents: list[dict[str, Any]] = [
            {
                "type": {"coding": [{"system": PROVENANCE_PARTICIPANT, "code": "author"}]},
                "who": {"reference": f"Organization/{actor.organization_id}"},
            },
            {
                "type": {"coding": [{"system": PROVENANCE_PARTICIPANT, "code": "performer"}]},
                "who": {"identifier": {"system": CLIENT_ID_SYSTEM, "value": actor.client_id}},
                "onBehalfOf": {"reference": f"Organization/{actor.organization_id}"},
            },
        ]
        if actor.person:
            agents.append(
                {
                    "type": {"coding": [{"system": PROVENANCE_PARTICIPANT, "code": "enterer"}]},
                    "who": {"identifier": {"system": PERSON_ID_SYSTEM, "value": actor.person}},
                    "onBehalfOf": {"reference": f"Organization/{actor.organization_id}"},
                }
            )
        return {
            "resourceType": "Provenance",
            "id": str(uuid.uuid4()),
            "target": [
                {"reference": f"{v.resource_type}/{v.resource_id}/_history/{v.version_id}"} for v in versions
            ],
            "recorded": now.isoformat().replace("+00:00", "Z"),
            "activity": {"coding": [{"system": DATA_OPERATION, "code": "UPDATE" if updated else "CREATE"}]},
            "agent": agents,
        }

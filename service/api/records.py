"""The clinical FHIR API: transaction, create, read, vread, update, history and search."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Annotated, TypeVar
from urllib.parse import parse_qsl, urlencode

import orjson
from fastapi import APIRouter, Header, Request
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import Response

from security.blind_index import BlindIndexer
from security.roles import Role
from service.api.auditing import audit, audit_read, rest_record
from service.api.authorization import (
    CLINIC,
    AnyCaller,
    ClinicCreate,
    ClinicTransaction,
    ClinicUpdate,
    ClinicValidate,
    ClinicValidateBundle,
    DisclosureAccounting,
    Interaction,
    PatientEverything,
    RecordHistory,
    RecordRead,
    RecordSearch,
    RecordVread,
    Rule,
    authorize,
)
from service.api.deps import Principal, ReadSessionDep, RuntimeDep, SessionDep
from service.api.fhir_body import read_fhir_json
from service.api.prefer import Return, http_date, outcome_of_write, return_preference, written_response
from service.api.resource_path import KnownType
from service.api.responses import FhirResponse, search_url
from service.api.shaping import only_elements
from service.audit.disclosures import WITHDRAWAL_NOTICE, Disclosure, disclosures_for_patient
from service.audit.events import Action, AuditEntity, EventType, Outcome
from service.domain.errors import DomainError
from service.http.errors import FHIR_JSON, FhirError, fhir_error
from service.identity.repository import IdentityRepository
from service.records.access import Permit, Visibility
from service.records.context import Actor
from service.records.idempotency import Idempotency, canonical_json, header_key
from service.records.idempotency_repository import IdempotencyRepository
from service.records.intake import (
    Intake,
    IntakeResult,
    PatientRaceLost,
    WrittenVersion,
    refuse_service_written,
)
from service.records.operation_params import MAX_EVERYTHING_COUNT, PageParameters, parse_page_parameters
from service.records.paging import CursorScope, PageCursor, decode_cursor, encode_cursor
from service.records.reading import Reader, ReadResult, bundle_bytes, history_position, history_version
from service.records.repository import RecordRepository
from service.records.resource_types import STORED_TYPES
from service.records.search_params import (
    GENERAL_PARAMETERS,
    IDENTIFYING_PARAMETERS,
    parse_elements,
    parse_search,
)

router = APIRouter(tags=["fhir"])
T = TypeVar("T")
PURPOSE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
IDENTIFIER_MASK = "masked"
HISTORY_PARAMETERS = frozenset({"_count", "_since", "_at", "_cursor", "_summary", "_elements"})
EVERYTHING_PARAMETERS = frozenset({"_count", "_since", "_type", "_cursor", "_summary", "_elements"})
DEFAULT_EVERYTHING_COUNT = 100
# The audit detail of a write answered from its first attempt.
REPLAY_DETAIL = "replay"
# Marks an answer replayed from the first attempt of the same request.
REPLAYED_HEADER = "Idempotent-Replayed"


def actor_of(principal: Principal) -> Actor:
    c = principal.claims
    return Actor(c.client_id, c.organization_id, c.role, c.person, c.purpose)


async def _guarded(
    principal: Principal,
    subtype: str,
    resource_type: str,
    resource_id: str,
    session: AsyncSession,
    runtime: RuntimeDep,
    fetch: Callable[[Reader, Visibility], Awaitable[T]],
    version_id: int | None = None,
) -> T:
    """Run a read as this principal may see; a refusal becomes a 404 with its audit entry."""
    reader = Reader(runtime.records, RecordRepository(session))
    try:
        return await fetch(reader, _visibility(principal))
    except (FhirError, DomainError) as refused:
        raise await _denied(
            principal, subtype, fhir_error(refused), resource_type, resource_id, session, runtime, version_id
        ) from None


def _resource_response(result: ReadResult, request: Request) -> Response:
    headers = {"ETag": result.etag, "Last-Modified": result.last_modified}
    asked = request.query_params.get("_elements")
    body = only_elements(result.body, parse_elements(asked)) if asked is not None else result.body
    return Response(body, media_type=FHIR_JSON, headers=headers)


async def _denied(
    principal: Principal,
    subtype: str,
    exc: FhirError,
    resource_type: str,
    resource_id: str,
    session: AsyncSession,
    runtime: RuntimeDep,
    version_id: int | None = None,
) -> FhirError:
    """Attach the refusal's audit entry; for an authority, with the part of its grants that did
    not match.

    The same work whether or not the id names anything (one statement that always answers one
    row, one keyed hash, one entry of the same shape): a refusal must not be told from a miss by
    its timing. Nothing is decrypted to explain a refusal.
    """
    visibility = _visibility(principal)
    facts = await RecordRepository(session).refusal_facts(
        resource_type, resource_id, visibility.audience, version_id
    )
    # An id that names nothing was typed by the caller and could be anything, a passport
    # number included: the audit trail keeps only a keyed hash of it.
    # It names the index key that made it: after a rotation an auditor who asks which id was
    # requested computes the hash under that key (while it is held); the entry itself never changes.
    indexer = runtime.records.indexer
    hashed = f"hmac:{indexer.kid}:" + indexer.token("requested-id", resource_type, resource_id).hex()
    record = rest_record(
        principal,
        subtype,
        Action.read,
        outcome=Outcome.minor_failure,
        entities=(AuditEntity(resource_type, resource_id if facts.exists else hashed),),
        detail="not-found" if exc.status == 404 else f"status-{exc.status}",
    )
    if exc.status == 404 and facts.reason is not None:
        record = replace(record, event_type=EventType.disclosure, decision_rule=facts.reason, detail="denied")
    exc.audit = record
    return exc


async def _store(
    session: SessionDep,
    runtime: RuntimeDep,
    principal: Principal,
    subtype: str,
    action: Action,
    work: Callable[[Intake], Awaitable[IntakeResult]],
) -> IntakeResult:
    """Run an intake, retrying once if a concurrent submission claimed the same identifier.

    No SAVEPOINT is needed for the retry: an intake that loses the race raises
    PatientRaceLost before it writes anything (see ``Intake._commit``).
    """
    for attempt in (1, 2):
        intake = Intake(runtime.records, RecordRepository(session), IdentityRepository(session))
        try:
            result = await work(intake)
            break
        except PatientRaceLost:
            if attempt == 2:
                raise FhirError.single(
                    409, "conflict", "concurrent submissions of the same identifier; retry"
                ) from None
    await audit(
        session,
        rest_record(
            principal,
            subtype,
            action,
            entities=result.audit_entities(),
            patient_ids=result.patient_ids(),
            detail=REPLAY_DETAIL if result.replayed else None,
        ),
    )
    return result


async def _write(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    principal: Principal,
    subtype: str,
    action: Action,
    body: object,
    idempotency_key: str | None,
    status_of: Callable[[IntakeResult], int],
    work: Callable[[Intake], Awaitable[IntakeResult]],
) -> tuple[IntakeResult, int]:
    """A write, answered from its first attempt when it repeats an ``Idempotency-Key``.

    The key is claimed in this request's transaction before the intake writes anything,
    and remembers the answer's status and versions when the transaction commits.
    """
    if idempotency_key is None:
        result = await _store(session, runtime, principal, subtype, action, work)
        return result, status_of(result)
    now = datetime.now(UTC)
    # The request as a whole: a retry repeats method, path, conditions and body.
    conditions = [f"{name}:{request.headers.get(name, '')}" for name in ("if-none-exist", "if-match")]
    fingerprint = b"\n".join(
        [
            request.method.encode(),
            f"{request.url.path}?{request.url.query}".encode(),
            *(c.encode() for c in conditions),
        ]
    )
    key = header_key(
        runtime.records.index_keys.live,
        principal.client_id,
        idempotency_key,
        fingerprint + b"\n" + canonical_json(body),
        now,
        runtime.settings.idempotency_key_ttl_seconds,
    )
    idempotency = Idempotency(IdempotencyRepository(session))
    remembered = await idempotency.claim(key, now)
    if remembered is not None:
        result = IntakeResult.replay(remembered)
        await audit(
            session,
            rest_record(
                principal,
                subtype,
                action,
                entities=result.audit_entities(),
                patient_ids=result.patient_ids(),
                detail=REPLAY_DETAIL,
            ),
        )
        return result, remembered.status
    result = await _store(session, runtime, principal, subtype, action, work)
    status = status_of(result)
    await idempotency.settle(key, result.remembered(status))
    return result, status


def _location(runtime: RuntimeDep, rtype: str, rid: str, version: int) -> str:
    return f"{runtime.settings.fhir_base_url}/{rtype}/{rid}/_history/{version}"


def _replay_headers(result: IntakeResult) -> dict[str, str]:
    return {REPLAYED_HEADER: "true"} if result.replayed else {}


async def _transaction_response(
    request: Request, result: IntakeResult, principal: Principal, session: AsyncSession, runtime: RuntimeDep
) -> Response:
    """The transaction-response, in the form the client preferred (minimal by default); a retry's
    names the versions its first attempt wrote, as that attempt would have answered."""
    preference = return_preference(request, Return.minimal)
    reader = Reader(runtime.records, RecordRepository(session))
    entries = []
    for written in result.by_entry:
        location = f"{written.resource_type}/{written.resource_id}/_history/{written.version_id}"
        response: dict[str, object] = {
            "status": written.status,
            "location": location,
            "etag": f'W/"{written.version_id}"',
            "lastModified": _instant(written.last_updated),
        }
        answer: dict[str, object] = {}
        if preference is Return.representation:
            # An ifNoneExist that matched, or a replay: the version this entry names.
            body = (
                written.body
                or (
                    await reader.vread(
                        _visibility(principal), written.resource_type, written.resource_id, written.version_id
                    )
                ).body
            )
            answer["resource"] = orjson.Fragment(body)
        elif preference is Return.outcome:
            response["outcome"] = orjson.Fragment(outcome_of_write(f"{written.status}: {location}"))
        answer["response"] = response
        entries.append(answer)
    return FhirResponse(
        {"resourceType": "Bundle", "type": "transaction-response", "entry": entries},
        headers=_replay_headers(result),
    )


async def _single_response(
    request: Request,
    result: IntakeResult,
    status: int,
    what: str,
    principal: Principal,
    session: AsyncSession,
    runtime: RuntimeDep,
) -> Response:
    """A create's or update's answer, in the form the client preferred: the version written (or
    matched, or first written, for a retry), with its Location, ETag and Last-Modified."""
    written = result.by_entry[0]
    body = written.body
    if not body:  # matched by If-None-Exist, or a replay: the stored version, as first answered
        reader = Reader(runtime.records, RecordRepository(session))
        stored = await reader.vread(
            _visibility(principal), written.resource_type, written.resource_id, written.version_id
        )
        body = stored.body
    location = _location(runtime, written.resource_type, written.resource_id, written.version_id)
    headers = {**_written_headers(location, written), **_replay_headers(result)}
    return written_response(
        return_preference(request, Return.representation), body, status=status, what=what, headers=headers
    )


_ENTRY_CREATE = Rule(Interaction.create, CLINIC)
_ENTRY_UPDATE = Rule(Interaction.update, CLINIC)


def _transaction_checks(principal: Principal, bundle: object, request: Request) -> None:
    """Each entry's interaction on its type, as if it came alone (the route admitted the Bundle)."""
    for entry in bundle.get("entry", []) if isinstance(bundle, dict) else []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        rtype = resource.get("resourceType") if isinstance(resource, dict) else None
        if isinstance(rtype, str) and rtype in STORED_TYPES:
            method = (entry.get("request") or {}).get("method")
            authorize(principal, _ENTRY_UPDATE if method == "PUT" else _ENTRY_CREATE, rtype, request)


IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        description="Any unique string per logical request: a retry with the same key gets the "
        "original answer (for idempotency_key_ttl_seconds, 24 h by default)."
    ),
]


@router.post("/fhir", response_class=FhirResponse, summary="transaction Bundle")
@router.post("/fhir/", response_class=FhirResponse, include_in_schema=False)
async def transaction(
    request: Request,
    principal: ClinicTransaction,
    session: SessionDep,
    runtime: RuntimeDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    bundle = await read_fhir_json(request)
    _transaction_checks(principal, bundle, request)
    actor = actor_of(principal)
    result, _ = await _write(
        request,
        session,
        runtime,
        principal,
        "transaction",
        Action.create,
        bundle,
        idempotency_key,
        lambda _: 200,
        lambda i: i.transaction(bundle, actor),
    )
    return await _transaction_response(request, result, principal, session, runtime)


def _created_status(result: IntakeResult) -> int:
    written = result.by_entry[0]
    return 201 if written.created and written.body else 200


@router.post("/fhir/{resource_type}", response_class=FhirResponse, summary="create")
async def create(
    resource_type: KnownType,
    request: Request,
    principal: ClinicCreate,
    session: SessionDep,
    runtime: RuntimeDep,
    if_none_exist: Annotated[str | None, Header()] = None,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    refuse_service_written(resource_type)  # before the body: the interaction itself does not exist
    resource = await read_fhir_json(request)
    if not isinstance(resource, dict) or resource.get("resourceType") != resource_type:
        raise FhirError.single(
            400, "invalid", "the body's resourceType must match the URL", expression="resourceType"
        )
    if any(name not in GENERAL_PARAMETERS for name in request.query_params):
        # The condition in the query string, as fhirpy's get_or_create sends it. The header is
        # better (an identifier in a URL reaches access logs), but a stock client is not changed.
        if if_none_exist is not None:
            raise FhirError.single(
                400, "invalid", "give the create's condition once: If-None-Exist or the query string"
            )
        if_none_exist = (
            urlencode([(n, v) for n, v in request.query_params.multi_items() if n not in GENERAL_PARAMETERS])
            or if_none_exist
        )
    actor = actor_of(principal)
    result, status = await _write(
        request,
        session,
        runtime,
        principal,
        "create",
        Action.create,
        resource,
        idempotency_key,
        _created_status,
        lambda i: i.create(resource, actor, if_none_exist),
    )
    what = (
        f"{resource_type} created"
        if status == 201
        else f"an existing {resource_type} matched If-None-Exist: nothing was created"
    )
    return await _single_response(request, result, status, what, principal, session, runtime)


def _written_headers(location: str, written: WrittenVersion) -> dict[str, str]:
    return {
        "Location": location,
        "ETag": f'W/"{written.version_id}"',
        "Last-Modified": http_date(written.last_updated),
    }


@router.put(
    "/fhir/{resource_type}/{resource_id}", response_class=FhirResponse, summary="update (new version)"
)
async def update(
    resource_type: KnownType,
    resource_id: str,
    request: Request,
    principal: ClinicUpdate,
    session: SessionDep,
    runtime: RuntimeDep,
    if_match: Annotated[str | None, Header()] = None,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    resource = await read_fhir_json(request)
    actor = actor_of(principal)
    result, status = await _write(
        request,
        session,
        runtime,
        principal,
        "update",
        Action.update,
        resource,
        idempotency_key,
        lambda _: 200,
        lambda i: i.update(resource_type, resource_id, resource, actor, if_match),
    )
    written = result.by_entry[0]
    what = f"{resource_type} updated: version {written.version_id}"
    return await _single_response(request, result, status, what, principal, session, runtime)


# --- $validate: a write's checks, nothing stored -------------------------------------------
async def _dry_run(
    runtime: RuntimeDep,
    principal: Principal,
    resource_type: str,
    work: Callable[[Intake], Awaitable[IntakeResult]],
) -> Response:
    """Run the write in a transaction that is always rolled back: every check a write makes
    (profiles, references, the migrant, conditional matches, Bundle.identifier) answers the same."""
    subtype = f"{resource_type}.validate"
    try:
        async with runtime.database.sessions() as scratch:
            await scratch.begin()
            try:
                intake = Intake(runtime.records, RecordRepository(scratch), IdentityRepository(scratch))
                try:
                    result = await work(intake)
                except PatientRaceLost:
                    raise FhirError.single(
                        409, "conflict", "a concurrent submission holds the same identifier; retry"
                    ) from None
            finally:
                await scratch.rollback()
    except (FhirError, DomainError) as refused:
        exc = fhir_error(refused)
        await audit_read(
            runtime,
            [
                rest_record(
                    principal,
                    subtype,
                    Action.execute,
                    outcome=Outcome.minor_failure,
                    detail=f"status-{exc.status}",
                )
            ],
        )
        raise
    await audit_read(runtime, [rest_record(principal, subtype, Action.execute, detail="valid")])
    diagnostics = "valid: a write of this content would be accepted; nothing was stored"
    if result.replayed:
        diagnostics = (
            "valid: this Bundle.identifier was already stored from the same content; "
            "submitting it again returns the original answer; nothing was stored"
        )
    return FhirResponse(
        {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "information", "code": "informational", "diagnostics": diagnostics}],
        }
    )


def _validate_input(body: object, resource_type: str) -> object:
    """$validate takes the resource itself, or Parameters with ``resource`` (and ``mode=create``)."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        return body
    resource: object = None
    for parameter in body.get("parameter", []) if isinstance(body.get("parameter"), list) else []:
        if not isinstance(parameter, dict):
            continue
        if parameter.get("name") == "mode" and parameter.get("valueCode") not in (None, "create"):
            raise FhirError.single(
                400, "not-supported", "$validate supports mode=create only", expression="Parameters.parameter"
            )
        if parameter.get("name") == "resource":
            resource = parameter.get("resource")
    if resource is None:
        raise FhirError.single(
            400,
            "required",
            f"Parameters needs a resource ({resource_type})",
            expression="Parameters.parameter",
        )
    return resource


@router.post("/fhir/Bundle/$validate", response_class=FhirResponse, summary="validate an exam Bundle")
async def validate_bundle(request: Request, principal: ClinicValidateBundle, runtime: RuntimeDep) -> Response:
    """The checks of ``POST /fhir`` on this transaction Bundle, with the same OperationOutcome and
    status when it fails; nothing is stored. For clinic IT testing their mapping."""
    bundle = _validate_input(await read_fhir_json(request), "Bundle")
    _transaction_checks(principal, bundle, request)
    actor = actor_of(principal)
    return await _dry_run(runtime, principal, "Bundle", lambda i: i.transaction(bundle, actor))


@router.post("/fhir/{resource_type}/$validate", response_class=FhirResponse, summary="validate (create)")
async def validate(
    resource_type: KnownType, request: Request, principal: ClinicValidate, runtime: RuntimeDep
) -> Response:
    """The checks of a create of this resource, with the same OperationOutcome and status when it
    fails; nothing is stored."""
    resource = _validate_input(await read_fhir_json(request), resource_type)
    if not isinstance(resource, dict) or resource.get("resourceType") != resource_type:
        raise FhirError.single(
            400, "invalid", "the resource's resourceType must match the URL", expression="resourceType"
        )
    actor = actor_of(principal)
    return await _dry_run(runtime, principal, resource_type, lambda i: i.create(resource, actor))


@router.delete("/fhir/{resource_type}/{resource_id}", response_class=FhirResponse, summary="not supported")
async def delete(resource_type: str, resource_id: str, principal: AnyCaller) -> Response:
    raise FhirError.single(
        405,
        "not-supported",
        "exams are never deleted: correct them with a new version or status entered-in-error",
        headers={"Allow": "GET, PUT"},
    )


# --- reads ---------------------------------------------------------------------------------
@router.get(
    "/fhir/Patient/{patient_id}/$everything", response_class=FhirResponse, summary="Patient $everything"
)
@router.post(
    "/fhir/Patient/{patient_id}/$everything",
    response_class=FhirResponse,
    summary="Patient $everything (parameters in a Parameters body)",
)
async def everything(
    patient_id: str,
    request: Request,
    principal: PatientEverything,
    session: ReadSessionDep,
    runtime: RuntimeDep,
) -> Response:
    """The patient and everything of theirs this caller may see, a page at a time (``_count``),
    of some types (``_type``) or written since a time (``_since``). POST takes the same
    parameters in a Parameters body."""
    params = list(request.query_params.multi_items())
    if request.method == "POST":
        params += await _operation_parameters(request)
    page = parse_page_parameters(
        params,
        allowed=EVERYTHING_PARAMETERS,
        max_count=MAX_EVERYTHING_COUNT,
        default_count=DEFAULT_EVERYTHING_COUNT,
        lenient=_lenient(request),
    )
    types = [t for t in (page.types or sorted(STORED_TYPES)) if principal.may(t, "r")]
    indexer = runtime.records.indexer
    scope = CursorScope(principal.client_id, f"Patient/{patient_id}/$everything", page.echo)
    cursor = decode_cursor(runtime.records.index_keys.live, page.cursor, scope) if page.cursor else None
    result = await _guarded(
        principal,
        "everything",
        "Patient",
        patient_id,
        session,
        runtime,
        lambda reader, seen: reader.everything(
            seen, patient_id, types, page, cursor.after if cursor else None, cursor.total if cursor else None
        ),
    )
    await _audit_reads(runtime, principal, "everything", result.rows)
    base = runtime.settings.fhir_base_url
    here = f"{base}/Patient/{patient_id}/$everything"
    further = (
        PageCursor(result.last_position, result.total) if result.has_next and result.last_position else None
    )
    links = _page_links(indexer, here, page, scope, further)
    entries = [
        (
            f"{base}/{r.row.resource_type}/{r.row.id}",
            only_elements(r.body, page.elements),
            b'"search":{"mode":"match"}',
        )
        for r in result.rows
    ]
    return Response(
        bundle_bytes("searchset", entries, total=result.total, links=links),
        media_type=FHIR_JSON,
    )


async def _operation_parameters(request: Request) -> list[tuple[str, str]]:
    """An operation's parameters from a POSTed Parameters resource (an empty body has none)."""
    if not (await request.body()).strip():
        return []
    body = await read_fhir_json(request)
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise FhirError.single(400, "invalid", "POST the operation's parameters as a Parameters resource")
    parameters = body.get("parameter", [])
    if not isinstance(parameters, list):
        raise FhirError.single(
            400, "structure", "Parameters.parameter must be an array", expression="parameter"
        )
    found = []
    for parameter in parameters:
        name = parameter.get("name") if isinstance(parameter, dict) else None
        values = [v for k, v in parameter.items() if k.startswith("value")] if name else []
        if not isinstance(name, str) or len(values) != 1 or not isinstance(values[0], (str, int)):
            raise FhirError.single(
                400, "invalid", "each parameter needs a name and one primitive value", expression="parameter"
            )
        found.append((name, str(values[0])))
    return found


@router.get(
    "/fhir/Patient/{patient_id}/$disclosures",
    response_class=FhirResponse,
    summary="accounting of disclosures",
)
async def disclosures(
    patient_id: str, principal: DisclosureAccounting, session: ReadSessionDep, runtime: RuntimeDep
) -> Response:
    """Every disclosure of a migrant's data (when, to whom, why, which kinds of resource), for the
    clinic that examined them to hand to the migrant on request (GDPR Art. 15, HIPAA accounting),
    and for auditors. An auditor reads the audit log, not the record: the same listing (ids,
    dates, purposes, types; no clinical data), with no check that the record exists."""
    if principal.role != Role.auditor:  # the examining clinic: the record must be theirs
        await _guarded(
            principal,
            "disclosures",
            "Patient",
            patient_id,
            session,
            runtime,
            lambda reader, seen: reader.read(seen, "Patient", patient_id),
        )
    found = await disclosures_for_patient(session, patient_id)
    identities = IdentityRepository(session)
    names = {org.id: org.name for org in await identities.organizations(limit=10_000)}
    record = rest_record(
        principal,
        "disclosures",
        Action.read,
        patient_ids=(patient_id,),
        entities=(AuditEntity("Patient", patient_id),),
    )
    await audit_read(runtime, [record])
    listing: dict[str, object] = {"resourceType": "Parameters"}
    if found:  # FHIR JSON has no empty arrays: no disclosures is a Parameters without any
        listing["parameter"] = [_disclosure_parameter(d, names) for d in found]
    return FhirResponse(listing)


def _disclosure_parameter(disclosure: Disclosure, names: dict[str, str]) -> dict[str, object]:
    parts: list[dict[str, object]] = [
        {"name": "recorded", "valueInstant": disclosure.recorded.isoformat().replace("+00:00", "Z")}
    ]
    for org in disclosure.organizations:
        parts.append(
            {
                "name": "recipient",
                "valueReference": {"reference": f"Organization/{org}", "display": names.get(org, org)},
            }
        )
    if disclosure.purpose:
        parts.append(
            {"name": "purpose", "valueCoding": {"system": PURPOSE_SYSTEM, "code": disclosure.purpose}}
        )
    parts.extend({"name": "resourceType", "valueCode": t} for t in disclosure.resource_types)
    if disclosure.consent:
        parts.append({"name": "consent", "valueReference": {"reference": disclosure.consent}})
    if disclosure.subtype == WITHDRAWAL_NOTICE:  # told of a withdrawal: notified, or not subscribed
        parts.append({"name": "notice", "valueCode": f"{WITHDRAWAL_NOTICE}.{disclosure.detail}"})
    return {"name": "disclosure", "part": parts}


@router.get("/fhir/{resource_type}/{resource_id}", response_class=FhirResponse, summary="read")
async def read(
    resource_type: KnownType,
    resource_id: str,
    request: Request,
    principal: RecordRead,
    session: ReadSessionDep,
    runtime: RuntimeDep,
) -> Response:
    result = await _guarded(
        principal,
        "read",
        resource_type,
        resource_id,
        session,
        runtime,
        lambda reader, seen: reader.read(seen, resource_type, resource_id),
    )
    await _audit_reads(runtime, principal, "read", [result])
    return _resource_response(result, request)


@router.get(
    "/fhir/{resource_type}/{resource_id}/_history/{version_id}", response_class=FhirResponse, summary="vread"
)
async def vread(
    resource_type: KnownType,
    resource_id: str,
    version_id: str,
    request: Request,
    principal: RecordVread,
    session: ReadSessionDep,
    runtime: RuntimeDep,
) -> Response:
    if not (version_id.isascii() and version_id.isdigit()) or len(version_id) > 9:
        raise FhirError.single(404, "not-found", f"{resource_type} version not found")
    result = await _guarded(
        principal,
        "vread",
        resource_type,
        resource_id,
        session,
        runtime,
        lambda reader, seen: reader.vread(seen, resource_type, resource_id, int(version_id)),
        int(version_id),
    )
    await _audit_reads(runtime, principal, "vread", [result])
    return _resource_response(result, request)


@router.get("/fhir/{resource_type}/{resource_id}/_history", response_class=FhirResponse, summary="history")
async def history(
    resource_type: KnownType,
    resource_id: str,
    request: Request,
    principal: RecordHistory,
    session: ReadSessionDep,
    runtime: RuntimeDep,
) -> Response:
    """A ``history`` Bundle, newest version first, a page at a time (``_count``, ``_since``,
    ``_at``), with only the versions this caller may see."""
    page = parse_page_parameters(
        list(request.query_params.multi_items()), allowed=HISTORY_PARAMETERS, lenient=_lenient(request)
    )
    indexer = runtime.records.indexer
    scope = CursorScope(principal.client_id, f"{resource_type}/{resource_id}/_history", page.echo)
    cursor = decode_cursor(runtime.records.index_keys.live, page.cursor, scope) if page.cursor else None
    before = history_version(cursor.after) if cursor else None
    found = await _guarded(
        principal,
        "history-instance",
        resource_type,
        resource_id,
        session,
        runtime,
        lambda reader, seen: reader.history(seen, resource_type, resource_id, page, before),
    )
    results = found.rows
    await _audit_reads(runtime, principal, "history-instance", results)
    base = runtime.settings.fhir_base_url
    here = f"{base}/{resource_type}/{resource_id}/_history"
    total = cursor.total if cursor and cursor.total is not None else found.total
    further = PageCursor(history_position(results[-1].row), total) if found.has_next and results else None
    links = _page_links(indexer, here, page, scope, further)
    entries = [
        (
            f"{base}/{r.row.resource_type}/{r.row.id}",  # version-independent (Bundle.entry.fullUrl)
            only_elements(r.body, page.elements),
            _history_entry(r),
        )
        for r in results
    ]
    return Response(
        bundle_bytes("history", entries, total=total, links=links),
        media_type=FHIR_JSON,
    )


def _history_entry(result: ReadResult) -> bytes:
    """entry.request and entry.response of one version: how it was written (bdl-4)."""
    row = result.row
    created = row.version_id == 1
    request = {
        "method": "POST" if created else "PUT",
        "url": row.resource_type if created else f"{row.resource_type}/{row.id}",
    }
    response = {
        "status": "201 Created" if created else "200 OK",
        "etag": result.etag,
        "lastModified": _instant(row.last_updated),
    }
    return orjson.dumps({"request": request, "response": response})[1:-1]


def _instant(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _url(path: str, params: list[tuple[str, str]]) -> str:
    return path + (f"?{urlencode(params)}" if params else "")


def _page_links(
    indexer: BlindIndexer, here: str, page: PageParameters, scope: CursorScope, further: PageCursor | None
) -> list[tuple[str, str]]:
    """self (what was asked, this page's cursor included) and, if another page follows, next."""
    count = [("_count", str(page.count))]
    this_page = [("_cursor", page.cursor)] if page.cursor else []
    links = [("self", _url(here, [*page.echo, *count, *this_page]))]
    if further is not None:
        links.append(
            ("next", _url(here, [*page.echo, *count, ("_cursor", encode_cursor(indexer, further, scope))]))
        )
    return links


def _lenient(request: Request) -> bool:
    return "handling=lenient" in request.headers.get("prefer", "").replace(" ", "")


def _visibility(principal: Principal) -> Visibility:
    return Visibility(actor_of(principal), datetime.now(UTC))


async def _audit_reads(
    runtime: RuntimeDep,
    principal: Principal,
    subtype: str,
    results: list[ReadResult],
    query: str | None = None,
) -> None:
    """One entry for a clinic's read; for an authority, one privacy-disclosure entry per migrant,
    naming the consent that permitted it. Written before the response: no entry, no data."""
    action = Action.execute if subtype in ("search-type", "everything") else Action.read
    if principal.role != Role.authority:
        record = rest_record(
            principal,
            subtype,
            action,
            entities=_entities(results),
            patient_ids=tuple(sorted({r.row.subject_id for r in results})),
            query=query,
        )
        await audit_read(runtime, [record])
        return
    # One entry per migrant and deciding consent, so each names exactly what permitted it.
    by_decision: dict[tuple[str, Permit], list[ReadResult]] = {}
    for result in results:
        by_decision.setdefault((result.row.subject_id, result.permit), []).append(result)
    if not by_decision:  # an empty search is still an access
        await audit_read(runtime, [rest_record(principal, subtype, action, query=query)])
        return
    records = []
    for (patient_id, permit), disclosed in by_decision.items():
        records.append(
            replace(
                rest_record(
                    principal,
                    subtype,
                    action,
                    entities=_entities(disclosed),
                    patient_ids=(patient_id,),
                    query=query,
                    event_type=EventType.disclosure,
                ),
                decision_rule=permit.rule,
                consent_id=permit.consent_id,
                consent_version=permit.consent_version,
                recipients=(principal.organization_id,),
            )
        )
    await audit_read(runtime, records)


def _entities(results: list[ReadResult]) -> tuple[AuditEntity, ...]:
    return tuple(
        AuditEntity(r.row.resource_type, r.row.id, r.row.version_id, r.row.ciphertext_sha256) for r in results
    )


async def _search(
    resource_type: str,
    params: list[tuple[str, str]],
    request: Request,
    principal: Principal,
    session: AsyncSession,
    runtime: RuntimeDep,
) -> Response:
    parsed = parse_search(
        resource_type,
        params,
        runtime.records.index_keys.live,
        lenient=_lenient(request),
        fhir_base_url=runtime.settings.fhir_base_url,
    )
    indexer = runtime.records.indexer
    # A migrant's identifier never goes into a link we write: links name the search without
    # it, and a next page's cursor carries its blind indexes, sealed.
    scope = CursorScope(principal.client_id, resource_type, parsed.linkable)
    cursor = decode_cursor(runtime.records.index_keys.live, parsed.cursor, scope) if parsed.cursor else None
    hidden = cursor.hidden if cursor else tuple((kind, tuple(tokens)) for kind, tokens in parsed.hidden)
    if cursor:
        parsed.filter.token_groups.extend((kind, list(tokens)) for kind, tokens in cursor.hidden)
    result = await Reader(runtime.records, RecordRepository(session)).search(
        _visibility(principal), parsed.filter, parsed, cursor
    )
    query = "&".join(sorted({name for name, _ in parsed.echo} | {kind for kind, _ in hidden}))
    await _audit_reads(runtime, principal, "search-type", result.rows, query=query)
    base = runtime.settings.fhir_base_url
    page = [("_count", str(parsed.count))]
    here = [("_cursor", parsed.cursor)] if parsed.cursor else [("_offset", str(parsed.offset))]
    # A migrant's identifier never goes into a link we write: the self link says that the
    # search was by identifier, with the value masked; the next link leaves it out (its cursor
    # carries it, sealed).
    public = [
        (n, IDENTIFIER_MASK if n.partition(":")[0] in IDENTIFYING_PARAMETERS else v) for n, v in parsed.echo
    ]
    links = [("self", search_url(base, resource_type, [*public, *page, *here]))]
    if result.has_next:
        if parsed.value_concepts:  # matched after decryption, within a bounded scan: by offset
            # No type has both value-concept and an identifying parameter (test_search_params).
            assert not hidden
            further = ("_offset", str(parsed.offset + parsed.count))
        else:
            position = result.last_position
            assert position is not None  # a next page follows a full one
            next_cursor = PageCursor(position, result.total, hidden)
            further = ("_cursor", encode_cursor(indexer, next_cursor, scope))
        links.append(("next", search_url(base, resource_type, [*parsed.linkable, *page, further])))
    entries = [
        (
            f"{base}/{r.row.resource_type}/{r.row.id}",
            only_elements(r.body, parsed.elements),
            b'"search":{"mode":"match"}',
        )
        for r in result.rows
    ]
    return Response(bundle_bytes("searchset", entries, total=result.total, links=links), media_type=FHIR_JSON)


@router.get("/fhir/{resource_type}", response_class=FhirResponse, summary="search")
async def search(
    resource_type: KnownType,
    request: Request,
    principal: RecordSearch,
    session: ReadSessionDep,
    runtime: RuntimeDep,
) -> Response:
    return await _search(
        resource_type, list(request.query_params.multi_items()), request, principal, session, runtime
    )


@router.post("/fhir/{resource_type}/_search", response_class=FhirResponse, summary="search (form body)")
async def search_post(
    resource_type: KnownType,
    request: Request,
    principal: RecordSearch,
    session: ReadSessionDep,
    runtime: RuntimeDep,
) -> Response:
    """Search with parameters in the body, so identifiers never appear in URLs or access logs."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/x-www-form-urlencoded":
        raise FhirError.single(
            415, "not-supported", "send search parameters as application/x-www-form-urlencoded"
        )
    try:
        form = parse_qsl((await request.body()).decode("utf-8"), keep_blank_values=True, max_num_fields=100)
    except (UnicodeDecodeError, ValueError):
        raise FhirError.single(400, "invalid", "malformed form body") from None
    params = [*request.query_params.multi_items(), *form]
    return await _search(resource_type, params, request, principal, session, runtime)

"""Subscription endpoints (HTTP only): CRUD and search of an authority's own Subscriptions,
``$status`` and ``$events`` (Subscriptions R5 Backport IG 1.1.0, R4).

Every write is audited in its transaction, every read through the audit writer; refusals go
through the one refusal chokepoint like every other route's.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from starlette.responses import Response

from service.api.auditing import audit, audit_read, rest_record
from service.api.authorization import (
    SubscriptionCreate,
    SubscriptionDelete,
    SubscriptionRead,
    SubscriptionSearch,
    SubscriptionUpdate,
)
from service.api.deps import Principal, ReadSessionDep, RuntimeDep, SessionDep
from service.api.fhir_body import read_fhir_json
from service.api.responses import FhirResponse, search_url, searchset
from service.audit.events import Action, AuditEntity
from service.http.errors import FhirError
from service.records.intake import validation_error
from service.records.repository import RecordRepository
from service.runtime.providers import Runtime
from service.store.tables import SubscriptionRow
from service.subscriptions.repository import SubscriptionRepository
from service.subscriptions.resource import CLIENT_STATUSES
from service.subscriptions.service import Owner, Subscriptions
from service.subscriptions.topics import topic_of

router = APIRouter(tags=["subscriptions"])

SubscriptionId = Annotated[str, Path(max_length=64, pattern=r"^[A-Za-z0-9\-.]{1,64}$")]
GENERAL = frozenset({"_format", "_pretty"})
SEARCH_PARAMETERS = frozenset({"_id", "status", "criteria", "_count"})
EVENTS_PARAMETERS = frozenset({"eventsSinceNumber", "eventsUntilNumber", "content"})


def _owner(principal: Principal) -> Owner:
    purpose = principal.claims.purpose
    if purpose is None:  # an authority token always carries one; refuse rather than guess
        raise FhirError.single(403, "forbidden", "the token names no purpose of use")
    return Owner(principal.claims.organization_id, purpose)


def _use_cases(session: Any, runtime: Runtime) -> Subscriptions:
    return Subscriptions(
        SubscriptionRepository(session),
        runtime.keys,
        allow_http=runtime.settings.is_development,
        fhir_base=runtime.settings.fhir_base_url,
    )


def _entity(row: SubscriptionRow) -> tuple[AuditEntity, ...]:
    return (AuditEntity("Subscription", row.id, row.version_id),)


def _written(runtime: Runtime, row: SubscriptionRow, resource: dict[str, Any], status: int) -> Response:
    location = f"{runtime.settings.fhir_base_url}/Subscription/{row.id}/_history/{row.version_id}"
    headers = {"Location": location, "ETag": f'W/"{row.version_id}"'}
    return FhirResponse(resource, status_code=status, headers=headers)


async def _validated_body(request: Request, runtime: Runtime) -> dict[str, Any]:
    resource = await read_fhir_json(request)
    if not isinstance(resource, dict) or resource.get("resourceType") != "Subscription":
        raise FhirError.single(400, "invalid", "the body must be a Subscription", expression="resourceType")
    validator = runtime.records.validator
    issues = await runtime.records.offload.run(lambda: validator.validate(resource))
    if any(i.severity in ("error", "fatal") for i in issues):
        raise validation_error(issues)
    return resource


@router.post(
    "/fhir/Subscription", response_class=FhirResponse, status_code=201, summary="create a subscription"
)
async def create(
    request: Request, principal: SubscriptionCreate, session: SessionDep, runtime: RuntimeDep
) -> Response:
    owner = _owner(principal)
    resource = await _validated_body(request, runtime)
    cases = _use_cases(session, runtime)
    row = await cases.create(owner, resource)
    await audit(session, rest_record(principal, "create", Action.create, entities=_entity(row)))
    return _written(runtime, row, cases.rendered(row), 201)


@router.put(
    "/fhir/Subscription/{subscription_id}", response_class=FhirResponse, summary="update a subscription"
)
async def update(
    subscription_id: SubscriptionId,
    request: Request,
    principal: SubscriptionUpdate,
    session: SessionDep,
    runtime: RuntimeDep,
) -> Response:
    owner = _owner(principal)
    resource = await _validated_body(request, runtime)
    cases = _use_cases(session, runtime)
    row = await cases.update(owner, subscription_id, resource)
    await audit(session, rest_record(principal, "update", Action.update, entities=_entity(row)))
    return _written(runtime, row, cases.rendered(row), 200)


@router.delete("/fhir/Subscription/{subscription_id}", summary="delete a subscription and its events")
async def delete(
    subscription_id: SubscriptionId, principal: SubscriptionDelete, session: SessionDep, runtime: RuntimeDep
) -> Response:
    owner = _owner(principal)
    await _use_cases(session, runtime).delete(owner, subscription_id)
    entities = (AuditEntity("Subscription", subscription_id),)
    await audit(session, rest_record(principal, "delete", Action.delete, entities=entities))
    return Response(status_code=204)


@router.get(
    "/fhir/Subscription/{subscription_id}", response_class=FhirResponse, summary="read a subscription"
)
async def read(
    subscription_id: SubscriptionId, principal: SubscriptionRead, session: ReadSessionDep, runtime: RuntimeDep
) -> Response:
    cases = _use_cases(session, runtime)
    row = await cases.read(_owner(principal), subscription_id)
    await audit_read(runtime, [rest_record(principal, "read", Action.read, entities=_entity(row))])
    return FhirResponse(cases.rendered(row), headers={"ETag": f'W/"{row.version_id}"'})


def _lenient(request: Request) -> bool:
    return "handling=lenient" in request.headers.get("prefer", "").replace(" ", "")


def _check_names(request: Request, allowed: frozenset[str]) -> None:
    unknown = sorted({n for n in request.query_params if n not in allowed and n not in GENERAL})
    if unknown and not _lenient(request):
        raise FhirError.single(400, "not-supported", f"unknown parameter: {unknown[0][:64]}")


def _number(request: Request, name: str, lowest: int) -> int | None:
    value = request.query_params.get(name)
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > 18 or int(value) < lowest:
        raise FhirError.single(
            400, "invalid", f"{name} must be a whole number of at least {lowest}", expression=name
        )
    return int(value)


@router.get("/fhir/Subscription", response_class=FhirResponse, summary="search the caller's subscriptions")
async def search(
    request: Request, principal: SubscriptionSearch, session: ReadSessionDep, runtime: RuntimeDep
) -> Response:
    owner = _owner(principal)
    _check_names(request, SEARCH_PARAMETERS)
    params = request.query_params
    statuses = [s for v in params.getlist("status") for s in v.split(",")]
    if any(s not in CLIENT_STATUSES for s in statuses):
        raise FhirError.single(
            400, "invalid", "status is requested, active, error or off", expression="status"
        )
    topics = []
    for value in (c for v in params.getlist("criteria") for c in v.split(",")):
        topic = topic_of(value)
        topics.append(topic.value if topic is not None else value)
    ids = [i for v in params.getlist("_id") for i in v.split(",")]
    count = _number(request, "_count", 0)
    limit = min(count if count is not None else 100, 100)
    cases = _use_cases(session, runtime)
    rows, total = await cases.repo.search(
        owner.organization_id, ids=ids, statuses=statuses, topics=topics, limit=limit
    )
    base = runtime.settings.fhir_base_url
    entries = [
        {
            "fullUrl": f"{base}/Subscription/{row.id}",
            "resource": cases.rendered(row),
            "search": {"mode": "match"},
        }
        for row in rows
    ]
    entities = tuple(AuditEntity("Subscription", row.id, row.version_id) for row in rows)
    query = ",".join(sorted({n for n in params if n in SEARCH_PARAMETERS}))
    await audit_read(
        runtime,
        [rest_record(principal, "search-type", Action.execute, entities=entities, query=query or None)],
    )
    self_url = search_url(
        base, "Subscription", [(n, v) for n, v in params.multi_items() if n in SEARCH_PARAMETERS]
    )
    return FhirResponse(searchset(entries, total=total, self_url=self_url))


@router.get(
    "/fhir/Subscription/{subscription_id}/$status",
    response_class=FhirResponse,
    summary="a subscription's status",
)
async def status(
    subscription_id: SubscriptionId,
    request: Request,
    principal: SubscriptionRead,
    session: ReadSessionDep,
    runtime: RuntimeDep,
) -> Response:
    _check_names(request, frozenset())
    bundle = await _use_cases(session, runtime).status(_owner(principal), subscription_id)
    entities = (AuditEntity("Subscription", subscription_id),)
    await audit_read(runtime, [rest_record(principal, "status", Action.read, entities=entities)])
    return FhirResponse(bundle)


@router.get(
    "/fhir/Subscription/{subscription_id}/$events",
    response_class=FhirResponse,
    summary="a subscription's events (catch up after an outage)",
)
async def events(
    subscription_id: SubscriptionId,
    request: Request,
    principal: SubscriptionRead,
    session: ReadSessionDep,
    runtime: RuntimeDep,
) -> Response:
    _check_names(request, EVENTS_PARAMETERS)
    answer = await _use_cases(session, runtime).events(
        _owner(principal),
        subscription_id,
        since=_number(request, "eventsSinceNumber", 1),
        until=_number(request, "eventsUntilNumber", 0),
        content=request.query_params.get("content"),
        records=RecordRepository(session),
    )
    # The ids it names are on the trail, as for a search that lists them.
    entities = (
        AuditEntity("Subscription", subscription_id),
        *(AuditEntity(t, i, v) for t, i, v in answer.disclosed),
    )
    await audit_read(runtime, [rest_record(principal, "events", Action.read, entities=entities)])
    return FhirResponse(answer.bundle)

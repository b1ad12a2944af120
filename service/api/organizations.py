"""``/fhir/Organization``: read and search the registered organizations."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from service.api.authorization import OrganizationRead, OrganizationSearch
from service.api.deps import RuntimeDep, SessionDep
from service.api.responses import FhirResponse, search_url, searchset
from service.http.errors import FhirError, not_found
from service.identity.organizations import organization_resource
from service.identity.registry import ORG_KINDS
from service.identity.repository import IdentityRepository

router = APIRouter()
_ALLOWED_PARAMS = {"name", "type", "_count", "_offset", "_format", "_pretty"}
MAX_COUNT = 100


@router.get("/fhir/Organization/{org_id}", tags=["fhir"], response_class=FhirResponse)
async def read_organization(org_id: str, _principal: OrganizationRead, session: SessionDep) -> FhirResponse:
    org = await IdentityRepository(session).organization(org_id)
    if org is None:
        raise not_found("Organization")
    return FhirResponse(organization_resource(org))


@router.get("/fhir/Organization", tags=["fhir"], response_class=FhirResponse)
async def search_organizations(
    request: Request,
    _principal: OrganizationSearch,
    session: SessionDep,
    runtime: RuntimeDep,
    name: str | None = None,
    type: str | None = None,
    count: Annotated[int, Query(alias="_count", ge=1, le=MAX_COUNT)] = 20,
    offset: Annotated[int, Query(alias="_offset", ge=0, le=100_000)] = 0,
) -> FhirResponse:
    unknown = set(request.query_params) - _ALLOWED_PARAMS
    if unknown and "handling=lenient" not in request.headers.get("prefer", ""):
        raise FhirError.single(
            400, "not-supported", "unknown search parameter", expression=sorted(unknown)[0]
        )
    if type is not None and type not in ORG_KINDS:
        raise FhirError.single(400, "value", f"type must be one of {', '.join(ORG_KINDS)}", expression="type")
    orgs = await IdentityRepository(session).organizations(
        name=name, kind=type, limit=count + 1, offset=offset
    )
    params = [(k, v) for k, v in (("name", name), ("type", type)) if v is not None]
    base = runtime.settings.fhir_base_url
    page = [("_count", str(count)), ("_offset", str(offset))]
    next_url = None
    if len(orgs) > count:
        next_url = search_url(
            base,
            "Organization",
            [*params, ("_count", str(count)), ("_offset", str(offset + count))],
        )
    entries = [
        {
            "fullUrl": f"{base}/Organization/{o.id}",
            "resource": organization_resource(o),
            "search": {"mode": "match"},
        }
        for o in orgs[:count]
    ]
    return FhirResponse(
        searchset(
            entries,
            total=None,
            self_url=search_url(base, "Organization", [*params, *page]),
            next_url=next_url,
        )
    )

"""``GET /fhir/metadata``: the CapabilityStatement, open to everyone as FHIR requires."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import RuntimeDep
from service.api.responses import FhirResponse

router = APIRouter()


@router.get("/fhir/metadata", tags=["fhir"], response_class=FhirResponse)
async def capability_statement(runtime: RuntimeDep) -> FhirResponse:
    return FhirResponse(runtime.capability_statement)

"""Erasure endpoints: admins request and approve (two-person rule); the clinic fetches its receipt.

- ``POST /admin/erasures`` ``{"patient": "<id>", "reason": "gdpr-art17-1b"}``: request (admin);
- ``POST /admin/erasures/{id}/approve``: a second admin approves, which erases at once;
- ``GET /admin/erasures/{id}``: status, and the signed receipt once erased (admin);
- ``POST /admin/retention-holds`` ``{"patient": "<id>", "legalBasis": "..."}`` and
  ``POST /admin/retention-holds/{id}/release``: statutory holds that block erasure (admin);
- ``GET /fhir/Patient/{id}/$erasure-receipt``: the receipt, for the clinic that submitted the
  migrant's record (everyone else: 404).

Every action, and every refusal, is on the audit record with the migrant's pseudonymous id.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from sqlalchemy import select
from starlette.responses import Response

from security.roles import Role
from service.api.auditing import audit, audit_read, rest_record
from service.api.authorization import (
    AnyCaller,
    ErasureApprover,
    ErasureRequester,
    ErasureStatusReader,
    RetentionHoldReleaser,
    RetentionHoldSetter,
)
from service.api.deps import Principal, ReadSessionDep, RuntimeDep, SessionDep
from service.api.fhir_body import read_fhir_json
from service.api.responses import FhirResponse
from service.audit.events import Action, AuditEntity, AuditRecord, EventType, Outcome
from service.domain.errors import DomainError
from service.erasure.repository import ErasureRepository
from service.erasure.requests import Admin, approve_erasure, release_hold, request_erasure, set_hold
from service.http.errors import FhirError, fhir_error, not_found
from service.store.tables import ErasureRequest, RetentionHold

router = APIRouter(tags=["erasure"])


def _admin(principal: Principal) -> Admin:
    return Admin(principal.client_id, principal.claims.person)


def _record(
    principal: Principal, subtype: str, action: Action, patient_id: str | None, *, ok: bool, detail: str
) -> AuditRecord:
    record = rest_record(
        principal,
        subtype,
        action,
        outcome=Outcome.success if ok else Outcome.minor_failure,
        entities=(AuditEntity("Patient", patient_id),) if patient_id else (),
        patient_ids=(patient_id,) if patient_id else (),
        detail=detail[:200],
        event_type=EventType.admin,
    )
    return record


def _patient_id(body: Any) -> str:
    value = body.get("patient") if isinstance(body, dict) else None
    if isinstance(value, str) and value.startswith("Patient/"):
        value = value.removeprefix("Patient/")
    if not isinstance(value, str) or not value or len(value) > 64 or not value.isascii():
        raise FhirError.single(400, "invalid", "patient must name a Patient id", expression="patient")
    return value


def _status(request: ErasureRequest) -> dict[str, Any]:
    def instant(at: datetime | None) -> str | None:
        return at.isoformat().replace("+00:00", "Z") if at is not None else None

    status: dict[str, Any] = {
        "id": request.id,
        "patient": f"Patient/{request.subject_id}",
        "organization": f"Organization/{request.organization_id}",
        "reason": request.reason,
        "state": request.state,
        "requestedAt": instant(request.requested_at),
        "requestedBy": request.requested_by,
        "approvedAt": instant(request.approved_at),
        "approvedBy": request.approved_by,
    }
    if request.receipt is not None:
        status["receipt"] = request.receipt
    return {k: v for k, v in status.items() if v is not None}


def _hold(hold: RetentionHold) -> dict[str, Any]:
    found = {
        "id": hold.id,
        "patient": f"Patient/{hold.subject_id}",
        "legalBasis": hold.legal_basis,
        "setBy": hold.set_by,
        "setAt": hold.set_at.isoformat().replace("+00:00", "Z"),
    }
    if hold.released_at is not None:
        found["releasedAt"] = hold.released_at.isoformat().replace("+00:00", "Z")
    return found


def _json(content: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return FhirResponse(content, status_code=status, headers=headers, media_type="application/json")


@router.post("/admin/erasures", status_code=201, summary="request an erasure (admin)")
async def request(
    request: Request, principal: ErasureRequester, session: SessionDep, runtime: RuntimeDep
) -> Response:
    body = await read_fhir_json(request)
    patient_id = _patient_id(body)
    reason = body.get("reason") if isinstance(body, dict) else None
    try:
        made = await request_erasure(
            session, _admin(principal), patient_id, str(reason or ""), datetime.now(UTC)
        )
    except DomainError as refused:
        exc = fhir_error(refused)
        exc.audit = _record(
            principal, "erasure-request", Action.create, patient_id, ok=False, detail=f"status-{exc.status}"
        )
        raise exc from None
    await audit(
        session, _record(principal, "erasure-request", Action.create, patient_id, ok=True, detail=made.reason)
    )
    location = f"{runtime.settings.public_base_url}/admin/erasures/{made.id}"
    return _json(_status(made), 201, {"Location": location})


@router.post("/admin/erasures/{request_id}/approve", summary="approve an erasure (a second admin)")
async def approve(
    request_id: str, principal: ErasureApprover, session: SessionDep, runtime: RuntimeDep
) -> Response:
    pending = await ErasureRepository(session).request(request_id)
    patient_id = pending.subject_id if pending is not None else None
    try:
        done = await approve_erasure(
            session, _admin(principal), request_id, runtime.log_signer, datetime.now(UTC)
        )
    except DomainError as refused:
        exc = fhir_error(refused)
        exc.audit = _record(
            principal, "erasure-approve", Action.delete, patient_id, ok=False, detail=f"status-{exc.status}"
        )
        raise exc from None
    await audit(
        session, _record(principal, "erasure-approve", Action.delete, patient_id, ok=True, detail="erased")
    )
    return _json(_status(done))


@router.get("/admin/erasures/{request_id}", summary="an erasure request's status and receipt (admin)")
async def status(request_id: str, principal: ErasureStatusReader, session: ReadSessionDep) -> Response:
    found = await ErasureRepository(session).request(request_id)
    if found is None:
        raise FhirError.single(404, "not-found", "erasure request not found")
    return _json(_status(found))


@router.post("/admin/retention-holds", status_code=201, summary="set a retention hold (admin)")
async def hold(request: Request, principal: RetentionHoldSetter, session: SessionDep) -> Response:
    body = await read_fhir_json(request)
    patient_id = _patient_id(body)
    basis = body.get("legalBasis") if isinstance(body, dict) else None
    try:
        made = await set_hold(session, _admin(principal), patient_id, basis, datetime.now(UTC))
    except DomainError as refused:
        exc = fhir_error(refused)
        exc.audit = _record(
            principal, "retention-hold", Action.create, patient_id, ok=False, detail=f"status-{exc.status}"
        )
        raise exc from None
    await audit(
        session, _record(principal, "retention-hold", Action.create, patient_id, ok=True, detail="hold-set")
    )
    return _json(_hold(made), 201)


@router.post("/admin/retention-holds/{hold_id}/release", summary="release a retention hold (admin)")
async def release(
    hold_id: Annotated[int, Path(ge=1, le=2**31 - 1)],  # an INTEGER key: larger ids name nothing
    principal: RetentionHoldReleaser,
    session: SessionDep,
) -> Response:
    released = await release_hold(session, hold_id, datetime.now(UTC))
    await audit(
        session,
        _record(
            principal,
            "retention-hold-release",
            Action.update,
            released.subject_id,
            ok=True,
            detail="hold-released",
        ),
    )
    return _json(_hold(released))


@router.get(
    "/fhir/Patient/{patient_id}/$erasure-receipt",
    response_class=FhirResponse,
    tags=["fhir"],
    summary="the signed erasure receipt (the submitting clinic)",
)
async def erasure_receipt(
    patient_id: str, principal: AnyCaller, session: ReadSessionDep, runtime: RuntimeDep
) -> Response:
    """A Parameters with the receipt (a C2SP signed note) and the key that verifies it."""
    found = None
    if principal.role == Role.clinic and principal.may("Patient", "r"):
        found = (
            await session.execute(
                select(ErasureRequest).where(
                    ErasureRequest.subject_id == patient_id,
                    ErasureRequest.organization_id == principal.organization_id,
                    ErasureRequest.state == "erased",
                )
            )
        ).scalar_one_or_none()
    ok = found is not None and found.receipt is not None
    await audit_read(
        runtime,
        [
            _record(
                principal,
                "erasure-receipt",
                Action.read,
                patient_id if ok else None,
                ok=ok,
                detail="receipt" if ok else "not-found",
            )
        ],
    )
    if found is None or found.receipt is None:
        raise not_found("Patient")
    return FhirResponse(
        {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "receipt", "valueString": found.receipt},
                {"name": "verifierKey", "valueString": runtime.log_signer.vkey()},
            ],
        }
    )

"""Erasure under a two-person rule, and the retention holds that block it.

One admin requests the erasure of a migrant (by pseudonymous Patient id, with a reason
code from GDPR Art. 17(1)); a *different* admin approves it: another client, and another
named person when both tokens name one. The approval erases at once (``erase_subject``)
and signs the receipt. A retention hold in force blocks both the request and the approval:
one set by an admin with its legal basis, or a Consent on a statutory legal basis (GDPR
Art. 17(3)(b)/(c): public-health notification required by law).

Use-cases only: the caller owns the transaction and writes the audit entries.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from security.signed_note import NoteSigner
from service.domain.errors import Conflict, Forbidden, Gone, Invalid, NotFound
from service.erasure.erase import AlreadyErased, NoSuchSubject, erase_subject
from service.erasure.receipt import receipt_body, sign_receipt
from service.erasure.repository import ErasureRepository
from service.store.tables import ErasureRequest, RetentionHold

# GDPR Art. 17(1) grounds, by code.
REASONS = {
    "gdpr-art17-1a": "no longer necessary for the purposes collected",
    "gdpr-art17-1b": "consent withdrawn",
    "gdpr-art17-1c": "objection to processing",
    "gdpr-art17-1d": "unlawfully processed",
    "gdpr-art17-1e": "erasure required by law",
}
MAX_LEGAL_BASIS = 200


@dataclass(frozen=True)
class Admin:
    """The admin acting: their client and, when the token names one, the person behind it."""

    client_id: str
    person: str | None = None


async def _check_holds(repo: ErasureRepository, subject_id: str, now: datetime) -> None:
    holds = await repo.active_holds(subject_id)
    if holds:
        hold = holds[0]
        raise Conflict(
            f"erasure blocked by retention hold {hold.id} (legal basis: {hold.legal_basis})",
            code="business-rule",
        )
    statutory = await repo.statutory_consents(subject_id, now)
    if statutory:
        consent_id, version = statutory[0]
        raise Conflict(
            f"erasure blocked by Consent/{consent_id}/_history/{version}, in force on a statutory "
            "legal basis (GDPR Art. 17(3))",
            code="business-rule",
        )


async def _subject_to_erase(repo: ErasureRepository, subject_id: str) -> None:
    subject = await repo.subject_for_update(subject_id)
    if subject is None:
        raise NotFound("Patient not found")
    if subject.erased_at is not None:
        done = await repo.completed_request(subject_id)
        named = f" (erasure request {done.id})" if done is not None else ""
        raise Gone(f"this migrant was already erased{named}")


async def request_erasure(
    session: AsyncSession, admin: Admin, patient_id: str, reason: str, now: datetime
) -> ErasureRequest:
    if reason not in REASONS:
        raise Invalid("reason must be one of " + ", ".join(sorted(REASONS)), expression="reason")
    repo = ErasureRepository(session)
    await _subject_to_erase(repo, patient_id)
    organization_id = await repo.submitting_organization(patient_id)
    if organization_id is None:
        raise NotFound("Patient not found")
    already = await repo.open_request(patient_id)
    if already is not None:
        raise Conflict(f"erasure request {already.id} for this migrant awaits approval")
    await _check_holds(repo, patient_id, now)
    request = ErasureRequest(
        id=uuid.uuid4().hex,
        subject_id=patient_id,
        organization_id=organization_id,
        reason=reason,
        state="requested",
        requested_by=admin.client_id,
        requested_by_person=admin.person,
        requested_at=now,
    )
    repo.add(request)
    await repo.flush()
    return request


def _same_admin(admin: Admin, request: ErasureRequest) -> bool:
    if admin.client_id == request.requested_by:
        return True
    return admin.person is not None and admin.person == request.requested_by_person


async def approve_erasure(
    session: AsyncSession, admin: Admin, request_id: str, signer: NoteSigner, now: datetime
) -> ErasureRequest:
    """The second admin's approval: erases the migrant and signs the receipt, or refuses."""
    repo = ErasureRepository(session)
    request = await repo.request(request_id, for_update=True)
    if request is None:
        raise NotFound("erasure request not found")
    if request.state == "erased":
        raise Gone("this erasure request was already approved and carried out")
    if _same_admin(admin, request):
        raise Forbidden("two-person rule: the admin who requested an erasure may not approve it")
    await _subject_to_erase(repo, request.subject_id)
    await _check_holds(repo, request.subject_id, now)
    try:
        destroyed = await erase_subject(
            session, request.subject_id, organization_id=request.organization_id, at=now
        )
    except (AlreadyErased, NoSuchSubject):
        raise Gone("this migrant was already erased") from None
    request.approved_by = admin.client_id
    request.approved_by_person = admin.person
    request.approved_at = now
    request.state = "erased"
    request.receipt = sign_receipt(signer, receipt_body(request, destroyed, now))
    await repo.flush()
    return request


def _legal_basis(text: object) -> str:
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_LEGAL_BASIS:
        raise Invalid(
            f"legalBasis must be a text of 1 to {MAX_LEGAL_BASIS} characters",
            expression="legalBasis",
        )
    if not text.isprintable():
        raise Invalid("legalBasis must be printable text", expression="legalBasis")
    return text.strip()


async def set_hold(
    session: AsyncSession, admin: Admin, patient_id: str, legal_basis: object, now: datetime
) -> RetentionHold:
    basis = _legal_basis(legal_basis)
    repo = ErasureRepository(session)
    await _subject_to_erase(repo, patient_id)
    hold = RetentionHold(subject_id=patient_id, legal_basis=basis, set_by=admin.client_id, set_at=now)
    repo.add(hold)
    await repo.flush()
    return hold


async def release_hold(session: AsyncSession, hold_id: int, now: datetime) -> RetentionHold:
    repo = ErasureRepository(session)
    hold = await repo.hold(hold_id)
    if hold is None:
        raise NotFound("retention hold not found")
    if hold.released_at is not None:
        raise Conflict(f"retention hold {hold.id} was already released")
    hold.released_at = now
    await repo.flush()
    return hold

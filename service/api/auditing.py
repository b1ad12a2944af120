"""Building audit records for API requests and handing them to the one recorder."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from service.api.deps import Principal
from service.audit.events import Action, AuditAgent, AuditEntity, AuditRecord, EventType, Outcome
from service.audit.recorder import record_audit
from service.core.request_context import SOURCE, current_request_id
from service.runtime.providers import Runtime


def agent_of(principal: Principal) -> AuditAgent:
    claims = principal.claims
    return AuditAgent(claims.client_id, claims.organization_id, claims.role, claims.person)


def rest_record(
    principal: Principal,
    subtype: str,
    action: Action,
    *,
    outcome: Outcome = Outcome.success,
    entities: tuple[AuditEntity, ...] = (),
    patient_ids: tuple[str, ...] = (),
    query: str | None = None,
    detail: str | None = None,
    event_type: EventType = EventType.rest,
) -> AuditRecord:
    return AuditRecord(
        event_type=event_type,
        subtype=subtype,
        action=action,
        outcome=outcome,
        agent=agent_of(principal),
        purpose=principal.claims.purpose,
        entities=entities,
        patient_ids=patient_ids,
        query=query,
        detail=detail,
    )


async def audit(session: AsyncSession, record: AuditRecord) -> None:
    """Write the entry in the caller's transaction: if it fails, the request fails."""
    await record_audit(session, record, request_id=current_request_id(), source=SOURCE)


async def audit_read(runtime: Runtime, records: list[AuditRecord]) -> None:
    """A read's entries, committed by the audit writer before this returns: no entry, no data."""
    await runtime.audit_writer.write(records, request_id=current_request_id(), source=SOURCE)

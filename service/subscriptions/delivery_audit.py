"""What a push to a subscriber puts on the audit trail, through the one AuditRecord builder.

One entry per event a notification carried (what focus, about which migrant, to which
organization, under which consent, with what outcome), and one per handshake. Failed attempts
are entries too (a receiver that answered 500 may still have read the ids). The entry names
the Subscription, never its endpoint or headers. Heartbeats carry no ids and are not audited.
"""

from __future__ import annotations

from service.audit.events import Action, AuditAgent, AuditEntity, AuditRecord, EventType, Outcome
from service.records.repository import GrantMatch
from service.store.tables import SubscriptionRow
from service.subscriptions.repository import EventRow
from service.subscriptions.sender import DELIVERED

NOTIFICATION_SUBTYPE = "subscription-notification"
HANDSHAKE_SUBTYPE = "subscription-handshake"


def _agent(row: SubscriptionRow) -> AuditAgent:
    return AuditAgent(client_id=None, organization_id=row.organization_id, role="authority")


def _outcome(code: str) -> Outcome:
    return Outcome.success if code == DELIVERED else Outcome.serious_failure


def event_delivery_record(
    row: SubscriptionRow, event: EventRow, grant: GrantMatch | None, outcome: str, *, id_only: bool
) -> AuditRecord:
    """One event pushed (or attempted) to the subscription's organization."""
    entities = [AuditEntity("Subscription", row.id, row.version_id)]
    if id_only:
        entities.append(AuditEntity(event.focus_type, event.focus_id, event.focus_version))
    return AuditRecord(
        event_type=EventType.disclosure,
        subtype=NOTIFICATION_SUBTYPE,
        action=Action.execute,
        outcome=_outcome(outcome),
        agent=_agent(row),
        purpose=row.purpose,
        entities=tuple(entities),
        patient_ids=(event.subject_id,) if event.subject_id else (),
        decision_rule=grant.rule if grant is not None else None,
        consent_id=grant.consent_id if grant is not None else None,
        consent_version=grant.consent_version if grant is not None else None,
        detail=f"event-{event.event_number}:{outcome}",
        recipients=(row.organization_id,),
    )


def handshake_record(row: SubscriptionRow, outcome: str) -> AuditRecord:
    return AuditRecord(
        event_type=EventType.rest,
        subtype=HANDSHAKE_SUBTYPE,
        action=Action.execute,
        outcome=_outcome(outcome),
        agent=_agent(row),
        entities=(AuditEntity("Subscription", row.id, row.version_id),),
        detail=outcome,
        recipients=(row.organization_id,),
    )

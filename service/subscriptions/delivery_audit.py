"""What a push to a subscriber puts on the audit trail, through the one AuditRecord builder.

Before a notification is POSTed, one disclosure entry per event it carries (what focus, about
which migrant, to which organization, under which consent), committed before anything leaves:
a worker killed mid-POST leaves the disclosure on the trail, whatever the receiver read. After
the POST, one entry for the notification's outcome (which event numbers, delivered or the failure
code): a receiver that answered 500 may still have read the ids, so a failed attempt keeps its
disclosure entries. Handshakes get one entry. Entries name the Subscription, never its endpoint
or headers. Heartbeats carry no ids and are not audited.
"""

from __future__ import annotations

from service.audit.events import Action, AuditAgent, AuditEntity, AuditRecord, EventType, Outcome
from service.records.repository import GrantMatch
from service.store.tables import SubscriptionRow
from service.subscriptions.repository import EventRow
from service.subscriptions.sender import DELIVERED

NOTIFICATION_SUBTYPE = "subscription-notification"
OUTCOME_SUBTYPE = "subscription-notification-outcome"
SENDING = "sending"
HANDSHAKE_SUBTYPE = "subscription-handshake"


def _agent(row: SubscriptionRow) -> AuditAgent:
    return AuditAgent(client_id=None, organization_id=row.organization_id, role="authority")


def _outcome(code: str) -> Outcome:
    return Outcome.success if code == DELIVERED else Outcome.serious_failure


def event_delivery_record(
    row: SubscriptionRow, event: EventRow, grant: GrantMatch | None, *, id_only: bool
) -> AuditRecord:
    """One event about to be pushed to the subscription's organization (its outcome follows in
    :func:`notification_outcome_record`)."""
    entities = [AuditEntity("Subscription", row.id, row.version_id)]
    if id_only:
        entities.append(AuditEntity(event.focus_type, event.focus_id, event.focus_version))
    return AuditRecord(
        event_type=EventType.disclosure,
        subtype=NOTIFICATION_SUBTYPE,
        action=Action.execute,
        outcome=Outcome.success,
        agent=_agent(row),
        purpose=row.purpose,
        entities=tuple(entities),
        patient_ids=(event.subject_id,) if event.subject_id else (),
        decision_rule=grant.rule if grant is not None else None,
        consent_id=grant.consent_id if grant is not None else None,
        consent_version=grant.consent_version if grant is not None else None,
        detail=f"event-{event.event_number}:{SENDING}",
        recipients=(row.organization_id,),
    )


def notification_outcome_record(row: SubscriptionRow, numbers: list[int], outcome: str) -> AuditRecord:
    """What came of one notification whose events' entries were committed before it was sent."""
    return AuditRecord(
        event_type=EventType.rest,
        subtype=OUTCOME_SUBTYPE,
        action=Action.execute,
        outcome=_outcome(outcome),
        agent=_agent(row),
        entities=(AuditEntity("Subscription", row.id, row.version_id),),
        detail=f"events-{numbers[0]}..{numbers[-1]}({len(numbers)}):{outcome}",
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

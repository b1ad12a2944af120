"""What a push to a subscriber puts on the audit trail, through the one AuditRecord builder.

Before a notification is POSTed, one disclosure entry per migrant (and deciding consent) whose
events it carries (which foci and event numbers, to which organization), committed before anything leaves:
a worker killed mid-POST leaves the disclosure on the trail, whatever the receiver read. After
the POST, one entry for the notification's outcome (which event numbers, delivered or the failure
code): a receiver that answered 500 may still have read the ids, so a failed attempt keeps its
disclosure entries. Handshakes get one entry. Entries name the Subscription, never its endpoint
or headers. Heartbeats carry no ids and are not audited.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def event_delivery_records(
    row: SubscriptionRow, sent: Sequence[tuple[EventRow, GrantMatch | None]], *, id_only: bool
) -> list[AuditRecord]:
    """The disclosure entries of a notification about to be pushed: one per migrant and deciding
    consent (as a bulk export's step writes them), naming each focus and event number it carries
    (its outcome follows in :func:`notification_outcome_record`)."""
    groups: dict[tuple[str | None, str | None, str | None, int | None], list[EventRow]] = {}
    for event, grant in sent:
        decided = (grant.rule, grant.consent_id, grant.consent_version) if grant else (None, None, None)
        groups.setdefault((event.subject_id, *decided), []).append(event)
    records = []
    for (subject_id, rule, consent_id, consent_version), events in groups.items():
        entities = [AuditEntity("Subscription", row.id, row.version_id)]
        if id_only:
            entities += [AuditEntity(e.focus_type, e.focus_id, e.focus_version) for e in events]
        records.append(
            AuditRecord(
                event_type=EventType.disclosure,
                subtype=NOTIFICATION_SUBTYPE,
                action=Action.execute,
                outcome=Outcome.success,
                agent=_agent(row),
                purpose=row.purpose,
                entities=tuple(entities),
                patient_ids=(subject_id,) if subject_id else (),
                decision_rule=rule,
                consent_id=consent_id,
                consent_version=consent_version,
                detail=f"events-{','.join(str(e.event_number) for e in events)}:{SENDING}",
                recipients=(row.organization_id,),
            )
        )
    return records


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

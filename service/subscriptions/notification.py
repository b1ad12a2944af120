"""``subscription-notification`` Bundles, R4 backport shape (IG 1.1.0), for pushes and operations.

A notification is a ``history`` Bundle whose first entry is a ``Parameters`` resource with the
backport SubscriptionStatus profile (status, type, eventsSinceSubscriptionStart and one
``notification-event`` per event). With ``id-only`` each event names its focus by absolute
reference, and the Bundle holds nothing else (the recipient fetches the resource with its own
token, through the consent filter); with ``empty`` an event is only its number and time. No
resource content is ever included: this service does not offer ``full-resource``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from service.subscriptions.backport import (
    EMPTY,
    ID_ONLY,
    NOTIFICATION_PROFILE,
    NOTIFICATION_TYPES,
    STATUS_PROFILE,
)


@dataclass(frozen=True)
class NotifiedEvent:
    """One event as a notification shows it."""

    event_number: int
    occurred_at: datetime
    focus_reference: str | None  # "Type/id/_history/n" (relative), or None


@dataclass(frozen=True)
class SubscriptionState:
    """What a notification says about its subscription."""

    subscription_id: str
    topic: str
    status: str
    events_since_start: int
    error: str | None = None


def instant(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def status_parameters(
    fhir_base: str,
    state: SubscriptionState,
    notification_type: str,
    events: Sequence[NotifiedEvent] = (),
    content: str = ID_ONLY,
) -> dict[str, Any]:
    """The SubscriptionStatus (a Parameters resource in R4)."""
    if notification_type not in NOTIFICATION_TYPES:
        raise ValueError(f"not a notification type: {notification_type}")
    parameters: list[dict[str, Any]] = [
        {
            "name": "subscription",
            "valueReference": {"reference": f"{fhir_base}/Subscription/{state.subscription_id}"},
        },
        {"name": "topic", "valueCanonical": state.topic},
        {"name": "status", "valueCode": state.status},
        {"name": "type", "valueCode": notification_type},
        # A string in R4: the count is an integer64 in R5.
        {"name": "events-since-subscription-start", "valueString": str(state.events_since_start)},
    ]
    for event in events:
        parts: list[dict[str, Any]] = [
            {"name": "event-number", "valueString": str(event.event_number)},
            {"name": "timestamp", "valueInstant": instant(event.occurred_at)},
        ]
        if content != EMPTY and event.focus_reference is not None:
            parts.append(
                {"name": "focus", "valueReference": {"reference": f"{fhir_base}/{event.focus_reference}"}}
            )
        parameters.append({"name": "notification-event", "part": parts})
    if state.error:
        parameters.append({"name": "error", "valueCodeableConcept": {"text": state.error}})
    return {
        "resourceType": "Parameters",
        "id": str(uuid.uuid4()),
        "meta": {"profile": [STATUS_PROFILE]},
        "parameter": parameters,
    }


def notification_bundle(
    fhir_base: str,
    state: SubscriptionState,
    notification_type: str,
    events: Sequence[NotifiedEvent] = (),
    content: str = ID_ONLY,
    *,
    now: datetime | None = None,
) -> dict[str, Any]:
    """A whole notification: handshake, heartbeat, event-notification or query-event.

    ``events`` in order of event number (a handshake or heartbeat has none). The status entry's
    request is the ``$status`` call it stands for, as the IG asks (bdl-3 and bdl-4).
    """
    status = status_parameters(fhir_base, state, notification_type, events, content)
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"profile": [NOTIFICATION_PROFILE]},
        "type": "history",
        "timestamp": instant(now or datetime.now(UTC)),
        "entry": [
            {
                "fullUrl": f"urn:uuid:{status['id']}",
                "resource": status,
                "request": {
                    "method": "GET",
                    "url": f"{fhir_base}/Subscription/{state.subscription_id}/$status",
                },
                "response": {"status": "200"},
            }
        ],
    }

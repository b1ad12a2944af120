"""Publishing subscription events, in the transaction of the change that causes them.

:func:`publish` fans each event out to the subscriptions of the organization it concerns that
record its topic, numbers the events per subscription (gap-free, in commit order: the IG's
``eventNumber`` and ``eventsSinceSubscriptionStart``), writes them and enqueues their delivery.
It never commits: the caller's transaction owns all of it, so an event exists exactly when its
cause committed, and a rolled-back write leaves none.

Events carry ids only (the focus's type, id and version, and the migrant's pseudonymous id, with
which consent is decided again at delivery and in ``$events``), never PHI.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from service.subscriptions.outbox import enqueue_delivery
from service.subscriptions.repository import SubscriptionRepository
from service.subscriptions.topics import Topic


@dataclass(frozen=True)
class Focus:
    """What an event is about: a resource (version), by id."""

    resource_type: str
    resource_id: str
    version_id: int | None = None

    @property
    def reference(self) -> str:
        base = f"{self.resource_type}/{self.resource_id}"
        return base if self.version_id is None else f"{base}/_history/{self.version_id}"


@dataclass(frozen=True)
class Event:
    """An event for one organization on one topic.

    ``purpose``: for record events, the purpose of use under which the organization may see the
    focus; only its subscriptions made under that purpose get it (delivery re-checks with it).
    None: every subscription of the organization on the topic (withdrawal notices, tasks).
    """

    topic: Topic
    organization_id: str
    focus: Focus
    subject_id: str | None = None
    purpose: str | None = None


@dataclass(frozen=True)
class Published:
    subscription_id: str
    organization_id: str
    event_number: int
    focus: Focus


async def publish(session: AsyncSession, events: Sequence[Event]) -> list[Published]:
    """Write each event for every subscription it concerns, and queue their delivery.

    Returns what was written, in event-number order per subscription. Subscriptions are locked
    in id order, so that two transactions publishing to the same ones cannot deadlock.
    """
    if not events:
        return []
    repo = SubscriptionRepository(session)
    by_topic: dict[Topic, list[Event]] = defaultdict(list)
    for event in events:
        by_topic[event.topic].append(event)
    per_subscription: dict[str, list[Event]] = defaultdict(list)
    owners: dict[str, str] = {}
    for topic, topic_events in by_topic.items():
        recipients = await repo.recipients(topic.value, (e.organization_id for e in topic_events))
        for recipient in recipients:
            for event in topic_events:
                if event.organization_id != recipient.organization_id:
                    continue
                if event.purpose is not None and event.purpose != recipient.purpose:
                    continue
                per_subscription[recipient.subscription_id].append(event)
                owners[recipient.subscription_id] = recipient.organization_id
    now = datetime.now(UTC)
    published: list[Published] = []
    rows: list[dict[str, object]] = []
    # The jobs first: numbering locks each subscription's counter until COMMIT (service.store.
    # database.at_commit runs this last), so that as little as possible follows it.
    for subscription_id in sorted(per_subscription):
        await enqueue_delivery(session, subscription_id)
    for subscription_id in sorted(per_subscription):
        wanted = _unique(per_subscription[subscription_id])
        last = await repo.issue_numbers(subscription_id, len(wanted))
        first = last - len(wanted) + 1
        for number, event in enumerate(wanted, start=first):
            rows.append(
                {
                    "subscription_id": subscription_id,
                    "event_number": number,
                    "occurred_at": now,
                    "focus_type": event.focus.resource_type,
                    "focus_id": event.focus.resource_id,
                    "focus_version": event.focus.version_id,
                    "subject_id": event.subject_id,
                }
            )
            published.append(Published(subscription_id, owners[subscription_id], number, event.focus))
    await repo.add_events(rows)
    return published


def _unique(events: list[Event]) -> list[Event]:
    """One event per focus for one subscription (a version admitted by two grants is one event)."""
    seen: set[tuple[Topic, Focus]] = set()
    kept = []
    for event in events:
        if (event.topic, event.focus) not in seen:
            seen.add((event.topic, event.focus))
            kept.append(event)
    return kept

"""Subscription use-cases: an authority's own subscriptions, their status and their events.

Rules only; SQL in the repository, HTTP in the endpoints. Nothing here commits. Another
organization's subscription is "not found", as if it did not exist.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from security.keys import KeyProvider
from service.domain.errors import Invalid, NotFound, Unprocessable
from service.records.grant_predicate import Audience, GrantFilter
from service.records.repository import RecordRepository
from service.records.resource_types import STORED_TYPES
from service.store.tables import SubscriptionRow
from service.subscriptions.backport import EMPTY, ID_ONLY, QUERY_EVENT, QUERY_STATUS
from service.subscriptions.headers import open_headers, seal_headers
from service.subscriptions.notification import (
    NotifiedEvent,
    SubscriptionState,
    notification_bundle,
    status_parameters,
)
from service.subscriptions.outbox import enqueue_handshake
from service.subscriptions.repository import EventRow, SubscriptionRepository
from service.subscriptions.resource import SubscriptionRequest, parse_subscription, render
from service.subscriptions.task_gate import TASK_TOPICS, tasks_still_owned
from service.subscriptions.topics import Topic

MAX_PER_ORGANIZATION = 100
MAX_EVENTS_PER_QUERY = 100


@dataclass(frozen=True)
class Owner:
    """The authority acting, and the purpose of use of its token."""

    organization_id: str
    purpose: str


@dataclass(frozen=True)
class EventsAnswer:
    bundle: dict[str, Any]
    # The focus references (Type/id/_history/n) the answer names: for its audit entry.
    disclosed: tuple[tuple[str, str, int | None], ...]


class Subscriptions:
    def __init__(
        self, repo: SubscriptionRepository, keys: KeyProvider, *, allow_http: bool, fhir_base: str
    ) -> None:
        self.repo = repo
        self.keys = keys
        self.allow_http = allow_http
        self.fhir_base = fhir_base

    # --- the resource -----------------------------------------------------------------
    def rendered(self, row: SubscriptionRow) -> dict[str, Any]:
        return render(row, open_headers(self.keys, row.id, row.headers_sealed))

    async def create(self, owner: Owner, resource: dict[str, Any]) -> SubscriptionRow:
        asked = parse_subscription(resource, allow_http=self.allow_http)
        _, count = await self.repo.search(owner.organization_id, limit=0)
        if count >= MAX_PER_ORGANIZATION:
            raise Unprocessable(
                f"an organization has at most {MAX_PER_ORGANIZATION} subscriptions", code="business-rule"
            )
        now = datetime.now(UTC)
        subscription_id = str(uuid.uuid4())
        row = SubscriptionRow(
            id=subscription_id,
            organization_id=owner.organization_id,
            purpose=owner.purpose,
            events_issued=0,
            events_delivered=0,
            version_id=1,
            created_at=now,
            error=None,
        )
        self._apply(row, asked, now)
        # Created as requested (or off): it becomes active only after a handshake succeeds.
        row.status = "off" if asked.status == "off" else "requested"
        await self.repo.add(row)
        if row.status == "requested":
            await enqueue_handshake(self.repo.session, row.id, row.version_id)
        return row

    async def update(self, owner: Owner, subscription_id: str, resource: dict[str, Any]) -> SubscriptionRow:
        row = await self.repo.get_for_update(subscription_id, owner.organization_id)
        if row is None:
            raise NotFound("Subscription not found")
        stored = open_headers(self.keys, row.id, row.headers_sealed)
        asked = parse_subscription(resource, allow_http=self.allow_http, stored_headers=stored)
        if asked.resource_id != subscription_id:
            raise Invalid("the resource id must be the id in the URL", expression="Subscription.id")
        if asked.topic.value != row.topic:
            raise Unprocessable(
                "a subscription's topic cannot change (its event numbers count that topic): create another",
                expression="Subscription.criteria",
                code="business-rule",
            )
        now = datetime.now(UTC)
        endpoint_changed = asked.endpoint != row.endpoint
        previous = row.status
        self._apply(row, asked, now)
        if asked.status == "off":
            row.status = "off"
        elif previous == "active" and not endpoint_changed:
            row.status = "active"
        else:  # turned on again, out of error, or a new endpoint: a new handshake first
            row.status = "requested"
            row.error = None
        row.purpose = owner.purpose
        row.version_id += 1
        await self.repo.session.flush()
        if row.status == "requested":
            await enqueue_handshake(self.repo.session, row.id, row.version_id)
        return row

    def _apply(self, row: SubscriptionRow, asked: SubscriptionRequest, now: datetime) -> None:
        row.topic = asked.topic.value
        row.reason = asked.reason
        row.endpoint = asked.endpoint
        row.payload_type = asked.payload_type
        row.payload_content = asked.content
        row.headers_sealed = seal_headers(self.keys, row.id, list(asked.headers))
        row.heartbeat_seconds = asked.heartbeat_seconds
        row.timeout_seconds = asked.timeout_seconds
        row.max_count = asked.max_count
        row.end_at = asked.end
        row.last_updated = now

    async def read(self, owner: Owner, subscription_id: str) -> SubscriptionRow:
        row = await self.repo.get(subscription_id, owner.organization_id)
        if row is None:
            raise NotFound("Subscription not found")
        return row

    async def delete(self, owner: Owner, subscription_id: str) -> None:
        row = await self.repo.get_for_update(subscription_id, owner.organization_id)
        if row is None:
            raise NotFound("Subscription not found")
        await self.repo.delete(row)

    # --- operations ---------------------------------------------------------------------
    def state(self, row: SubscriptionRow) -> SubscriptionState:
        return SubscriptionState(row.id, row.topic, row.status, row.events_issued, row.error)

    async def status(self, owner: Owner, subscription_id: str) -> dict[str, Any]:
        """``$status``: a searchset Bundle holding the subscription's SubscriptionStatus."""
        row = await self.read(owner, subscription_id)
        parameters = status_parameters(self.fhir_base, self.state(row), QUERY_STATUS)
        return {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": 1,
            "entry": [
                {
                    "fullUrl": f"urn:uuid:{parameters['id']}",
                    "resource": parameters,
                    "search": {"mode": "match"},
                }
            ],
        }

    async def events(
        self,
        owner: Owner,
        subscription_id: str,
        *,
        since: int | None,
        until: int | None,
        content: str | None,
        records: RecordRepository,
    ) -> EventsAnswer:
        """``$events``: the subscription's events from ``since`` to ``until`` (at most 100, oldest
        first: ask again from the last number + 1), as a ``query-event`` notification.

        Consent is decided again, now, for every record event: one whose focus the authority may
        no longer see is left out (its number stays counted in eventsSinceSubscriptionStart,
        so the gap shows that something was withheld, not lost)."""
        row = await self.read(owner, subscription_id)
        first = since if since is not None else 1
        last = until if until is not None else row.events_issued
        if first < 1 or last < 0:
            raise Invalid("event numbers start at 1", expression="eventsSinceNumber")
        shown_content = content or row.payload_content
        if shown_content not in (ID_ONLY, EMPTY):
            raise Invalid(
                "content is id-only or empty (full-resource is not offered)",
                expression="content",
                code="not-supported",
            )
        rows = await self.repo.events(row.id, first, last, MAX_EVENTS_PER_QUERY)
        visible = await still_visible(row, rows, records)
        shown = [e for e in rows if e.event_number in visible]
        bundle = notification_bundle(
            self.fhir_base, self.state(row), QUERY_EVENT, notified(shown, shown_content), shown_content
        )
        disclosed = (
            tuple((e.focus_type, e.focus_id, e.focus_version) for e in shown)
            if shown_content == ID_ONLY
            else ()
        )
        return EventsAnswer(bundle, disclosed)


async def still_visible(row: SubscriptionRow, events: list[EventRow], records: RecordRepository) -> set[int]:
    """The numbers of the events whose focus the subscriber may see now: for record events, the
    grant predicate with the subscription's organization and purpose (one statement for all).
    The same decision for ``$events`` and for delivery (service.subscriptions.delivery)."""
    if row.topic in TASK_TOPICS:
        owned = await tasks_still_owned(
            records.session, row.organization_id, (e.focus_id for e in events if e.focus_type == "Task")
        )
        return {e.event_number for e in events if e.focus_id in owned}
    if row.topic != Topic.record_visible.value:
        # Withdrawal notices name the Consent that no longer admits anything: not gated.
        return {e.event_number for e in events}
    refs = {(e.focus_type, e.focus_id, e.focus_version) for e in events if e.focus_type in STORED_TYPES}
    audience = Audience(grant=GrantFilter(row.organization_id, row.purpose, datetime.now(UTC)))
    seen = await records.visible_references(refs, audience)
    return {e.event_number for e in events if (e.focus_type, e.focus_id, e.focus_version) in seen}


def notified(events: list[EventRow], content: str) -> list[NotifiedEvent]:
    """Events as a notification shows them: with their focus for id-only, without for empty."""
    return [
        NotifiedEvent(e.event_number, e.occurred_at, _focus_reference(e) if content == ID_ONLY else None)
        for e in events
    ]


def _focus_reference(event: EventRow) -> str:
    base = f"{event.focus_type}/{event.focus_id}"
    return base if event.focus_version is None else f"{base}/_history/{event.focus_version}"

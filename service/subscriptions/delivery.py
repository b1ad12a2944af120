"""The ``subscription-delivery`` job: push a subscription's pending events, in order, to its endpoint.

Whichever job runs (one is queued per transaction that published events, one per handshake, one
per retry), it delivers everything pending for the subscription: events numbered after
``events_delivered``, oldest first, ``max_count`` per notification. The subscription row is
locked for the run, so two workers never push the same subscription at once, and the cursor
advances in the transaction that completes the job: a receiver sees events strictly in order.

- **Handshake.** A ``requested`` subscription first gets a ``handshake`` notification: a 2xx
  makes it ``active``, anything else ``error`` (the authority re-requests it; IG "Handling
  Errors": the subscriber decides how to recover).
- **Consent at delivery.** A record event is sent only if the grant predicate still lets the
  organization see that version now (RecordRepository.permit_for_version, the rule of every
  read). One it may not see is withheld: not sent, its number passed over. Later notifications
  still count it in eventsSinceSubscriptionStart and ``$events`` leaves it out too, so the
  receiver sees a gap that stays a gap: something happened that it may no longer be shown.
  Withdrawal notices (focus: the Consent) and task events are not gated by record grants.
- **Retries.** A failure (no 2xx, a timeout, a refused connection) stops the run at that
  notification and schedules a retry job, with exponential backoff (base, doubling, capped,
  jittered) until MHR_SUBSCRIPTION_RETRY_HOURS after the first failure; then the status is
  ``error`` and the events stay for ``$events`` (and for delivery once re-activated: the cursor
  did not move). A job that runs while a retry is pending leaves the work to the retry.
- **Crashes.** The cursor commits with the job. A worker killed after a POST but before its
  commit leaves the job to be taken over: the same events are sent again with the same event
  numbers (the IG's duplicates; receivers deduplicate by event number). Nothing is skipped.

Every push is on the audit trail (service.subscriptions.delivery_audit), in the job's
transaction. The endpoint and the decrypted headers live in memory for the job only.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
from sqlalchemy.ext.asyncio import AsyncSession

from service.audit.events import AuditRecord
from service.audit.recorder import PendingEntry, insert_entries, record_audit
from service.jobs import JobContext, JobKind, enqueue
from service.jobs.kinds import register
from service.records.grant_predicate import GrantFilter
from service.records.repository import GrantMatch, RecordRepository
from service.records.resource_types import STORED_TYPES
from service.request_context import SOURCE
from service.settings import Settings
from service.store.tables import SubscriptionDeliveryState, SubscriptionRow
from service.subscriptions.backport import EMPTY, EVENT_NOTIFICATION, HANDSHAKE
from service.subscriptions.delivery_audit import event_delivery_record, handshake_record
from service.subscriptions.delivery_rows import channel_of, lock_delivery, touch, utcnow
from service.subscriptions.heartbeat import schedule_heartbeat
from service.subscriptions.notification import NotifiedEvent, SubscriptionState, notification_bundle
from service.subscriptions.outbox import DELIVERY_KIND, DeliveryPayload
from service.subscriptions.repository import EventRow, SubscriptionRepository
from service.subscriptions.sender import DELIVERED, new_client, post_notification
from service.subscriptions.task_gate import TASK_TOPICS, tasks_still_owned
from service.subscriptions.topics import Topic

log = logging.getLogger("mhr.subscriptions")

# Per job at most this many notifications; the rest goes to a follow-on job, so that one busy
# subscription does not hold a worker (or, on SQLite, the write lock) for long.
MAX_NOTIFICATIONS_PER_JOB = 20
# Without the subscriber's maxCount: a receiver catching up after an outage gets its backlog
# in notifications of this many events (each still numbered; receivers deduplicate by number).
DEFAULT_EVENTS_PER_NOTIFICATION = 50
MAX_EVENT_NUMBER = 2**62

_rng = random.Random()  # noqa: S311 - jitter, not a secret


@dataclass(frozen=True)
class RetryPolicy:
    base_seconds: float
    cap_seconds: float
    give_up_after: timedelta

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            settings.subscription_retry_base_seconds,
            settings.subscription_retry_cap_seconds,
            timedelta(hours=settings.subscription_retry_hours),
        )

    def delay(self, failures: int) -> float:
        """Seconds before the next attempt after ``failures`` in a row: doubling, capped, with
        jitter (half to full) so that receivers that failed together are not retried together."""
        ceiling = min(self.cap_seconds, self.base_seconds * 2.0 ** min(failures - 1, 60))
        return ceiling * (0.5 + _rng.random() / 2)


def _state(row: SubscriptionRow, latest_event: int = 0) -> SubscriptionState:
    # The row was read when the job started; events committed since are counted too.
    return SubscriptionState(row.id, row.topic, row.status, max(row.events_issued, latest_event), row.error)


def _focus_reference(event: EventRow) -> str:
    base = f"{event.focus_type}/{event.focus_id}"
    return base if event.focus_version is None else f"{base}/_history/{event.focus_version}"


class Delivery:
    """One job's run over one locked subscription."""

    def __init__(
        self,
        job: JobContext[DeliveryPayload],
        session: AsyncSession,
        row: SubscriptionRow,
        state: SubscriptionDeliveryState,
        client: httpx.AsyncClient,
    ) -> None:
        self.job = job
        self.session = session
        self.row = row
        self.state = state
        self.client = client
        self.channel = channel_of(row, job)
        self.fhir_base = job.runtime.settings.fhir_base_url
        self.policy = RetryPolicy.from_settings(job.runtime.settings)
        self.records = RecordRepository(session)
        self.events = SubscriptionRepository(session)
        self.request_id = f"job-{job.job_id}"
        self.cursor = row.events_delivered  # the last event number done (sent or withheld)

    async def _audit(self, record: AuditRecord) -> None:
        await record_audit(self.session, record, request_id=self.request_id, source=SOURCE)

    async def handshake(self, now: datetime) -> None:
        row = self.row
        bundle = notification_bundle(self.fhir_base, _state(row), HANDSHAKE, now=now)
        outcome = await post_notification(self.client, self.channel, bundle)
        await self._audit(handshake_record(row, outcome))
        self.state.last_outcome = outcome
        if outcome == DELIVERED:
            row.status, row.error = "active", None
            self.state.last_sent_at = now
            self.state.failing_since, self.state.failures, self.state.retry_at = None, 0, None
        else:
            row.status, row.error = "error", f"handshake failed ({outcome})"
        touch(row, now)
        log.info(
            "subscription handshake",
            extra={"subscription_id": row.id, "outcome": outcome, "status": row.status},
        )

    async def _permit(self, event: EventRow, at: datetime) -> tuple[bool, GrantMatch | None]:
        """May the organization be told of this event now, and on which grant?"""
        if self.row.topic in TASK_TOPICS:
            owned = await tasks_still_owned(self.records.session, self.row.organization_id, [event.focus_id])
            return event.focus_id in owned, None
        if self.row.topic != Topic.record_visible.value:
            return True, None  # a Consent withdrawn: told whatever the record grants say now
        if event.focus_type not in STORED_TYPES or event.focus_version is None:
            return False, None
        grant = await self.records.permit_for_version(
            event.focus_type,
            event.focus_id,
            event.focus_version,
            GrantFilter(self.row.organization_id, self.row.purpose, at),
        )
        return grant is not None, grant

    async def push_pending(self, now: datetime) -> bool:
        """Send pending events until none is left or one fails; True if some may be left.

        The cursor is written once, at the end: an update of the subscription row takes its lock,
        which an intake publishing an event needs too, so it is taken just before the commit."""
        row = self.row
        cursor = row.events_delivered
        try:
            return await self._push_after(cursor)
        finally:
            if self.cursor != cursor:
                row.events_delivered = self.cursor

    async def _push_after(self, cursor: int) -> bool:
        row = self.row
        self.cursor = cursor
        per_notification = row.max_count or DEFAULT_EVENTS_PER_NOTIFICATION
        id_only = row.payload_content != EMPTY
        for _ in range(MAX_NOTIFICATIONS_PER_JOB):
            # No upper bound: events committed while this job runs are delivered by it too.
            pending = await self.events.events(row.id, self.cursor + 1, MAX_EVENT_NUMBER, per_notification)
            if not pending:
                return False
            sent: list[tuple[EventRow, GrantMatch | None]] = []
            for event in pending:
                permitted, grant = await self._permit(event, utcnow())
                if permitted:
                    sent.append((event, grant))
            if sent:
                bundle = notification_bundle(
                    self.fhir_base,
                    _state(row, pending[-1].event_number),
                    EVENT_NOTIFICATION,
                    [
                        NotifiedEvent(e.event_number, e.occurred_at, _focus_reference(e) if id_only else None)
                        for e, _ in sent
                    ],
                    row.payload_content,
                )
                outcome = await post_notification(self.client, self.channel, bundle)
                # One entry per event, inserted together (two statements for the notification).
                await insert_entries(
                    self.session,
                    [
                        PendingEntry(
                            event_delivery_record(row, event, grant, outcome, id_only=id_only),
                            self.request_id,
                            SOURCE,
                        )
                        for event, grant in sent
                    ],
                )
                self.state.last_outcome = outcome
                if outcome != DELIVERED:
                    await self._failed(outcome, utcnow())
                    return False
                self.state.last_sent_at = utcnow()
                self.state.failing_since, self.state.failures, self.state.retry_at = None, 0, None
            # Delivered, or withheld (no consent now): either way these numbers are done.
            self.cursor = pending[-1].event_number
            log.info(
                "subscription events delivered",
                extra={
                    "subscription_id": row.id,
                    "through_event": self.cursor,
                    "sent": len(sent),
                    "withheld": len(pending) - len(sent),
                },
            )
        return True  # the job's share is used up: a follow-on job goes on from the cursor

    async def _failed(self, outcome: str, now: datetime) -> None:
        state, row = self.state, self.row
        if state.failing_since is None:
            state.failing_since, state.failures = now, 0
        state.failures += 1
        deadline = state.failing_since + self.policy.give_up_after
        if now >= deadline:
            row.status = "error"
            hours = self.policy.give_up_after.total_seconds() / 3600
            row.error = f"delivery failed for {hours:g} h ({outcome}); events kept for $events"
            state.retry_at = None
            touch(row, now)
            log.warning(
                "subscription delivery gave up: status error",
                extra={"subscription_id": row.id, "failures": state.failures, "outcome": outcome},
            )
            return
        retry_at = min(now + timedelta(seconds=self.policy.delay(state.failures)), deadline)
        state.retry_at = retry_at
        key = f"{row.id}:retry:{int(state.failing_since.timestamp() * 1000)}:{state.failures}"
        await enqueue(
            self.session, DELIVERY, DeliveryPayload(subscription_id=row.id), key, run_after=retry_at
        )
        log.info(
            "subscription delivery failed; will retry",
            extra={
                "subscription_id": row.id,
                "failures": state.failures,
                "outcome": outcome,
                "retry_in_seconds": round((retry_at - now).total_seconds(), 1),
            },
        )


async def _run(job: JobContext[DeliveryPayload], session: AsyncSession) -> None:
    locked = await lock_delivery(session, job.payload.subscription_id)
    if locked is None:
        return  # deleted with its events: nothing to deliver
    row, state = locked
    if row.status not in ("requested", "active"):
        return  # error or off: events are kept for $events; the authority re-activates
    now = utcnow()
    if row.status == "active" and state.retry_at is not None and now < state.retry_at:
        return  # backing off: the retry job due then does the work
    async with new_client() as client:
        delivery = Delivery(job, session, row, state, client)
        if row.status == "requested":
            await delivery.handshake(now)
            if row.status != "active":
                return
        more = await delivery.push_pending(now)
    if more:
        key = f"{row.id}:after:{row.events_delivered}"
        await enqueue(session, DELIVERY, DeliveryPayload(subscription_id=row.id), key)
    await schedule_heartbeat(session, row, state)


DELIVERY = register(
    JobKind(
        name=DELIVERY_KIND,
        payload_type=DeliveryPayload,
        run=_run,
        # A failed POST is not a failed job (the retry above is a job of its own); attempts are
        # spent only by crashes and database errors.
        max_attempts=20,
        backoff_base_seconds=2.0,
        backoff_cap_seconds=300.0,
    )
)

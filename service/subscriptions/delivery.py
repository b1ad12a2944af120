"""The ``subscription-delivery`` job: push a subscription's pending events, in order, to its endpoint.

Whichever job runs (one is queued per transaction that published events, one per handshake, one
per retry), it delivers everything pending for the subscription: events numbered after
``events_delivered``, oldest first, ``max_count`` per notification.

- **No transaction across a POST.** The job runs in steps (service.jobs ``run_in_steps``), each a
  short transaction: (1) claim the subscription (one sender at a time, so a receiver sees events
  strictly in order: a claim on the delivery state row that holds for the job lease plus the
  POST timeout and is renewed by every step); (2) per notification, re-check consent and commit
  the disclosure entries of the events it carries; POST with no transaction open (on SQLite no
  write lock is held while a receiver is slow); (3) record the outcome and advance the cursor;
  (4) let the claim go, queueing a follow-on job if events are left. A job that finds another
  job's live claim leaves the work to it (the sender looks for pending events once more as it
  lets go, under the same row lock) and queues a job for when that claim would run out, in case
  the sender died.
- **Handshake.** A ``requested`` subscription first gets a ``handshake`` notification: a 2xx
  makes it ``active``, anything else ``error`` (the authority re-requests it; IG "Handling
  Errors": the subscriber decides how to recover).
- **Consent at delivery.** A record event is sent only if the grant predicate still lets the
  organization see that version now (the rule of every read), checked in the step just before
  the POST. One it may not see is withheld: not sent, its number passed over. Later
  notifications still count it in eventsSinceSubscriptionStart and ``$events`` leaves it out
  too, so the receiver sees a gap that stays a gap: something happened that it may no longer be
  shown. Withdrawal notices (focus: the Consent) and task events are not gated by record grants.
- **Retries.** A failure (no 2xx, a timeout, a refused connection) stops the run at that
  notification and schedules a retry job, with exponential backoff (base, doubling, capped,
  jittered) until MHR_SUBSCRIPTION_RETRY_HOURS after the first failure; then the status is
  ``error`` and the events stay for ``$events`` (and for delivery once re-activated: the cursor
  did not move). A job that runs while a retry is pending leaves the work to the retry.
- **Crashes.** The cursor moves in the step after a POST. A worker killed after a POST but before
  that commit leaves the job (and its claim) to be taken over: the same events are sent again
  with the same event numbers (the IG's duplicates; receivers deduplicate by event number), their
  disclosure entries already on the trail. Nothing is skipped.

The endpoint and the decrypted headers live in memory for the job only.
"""

from __future__ import annotations

import logging
import random
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
from sqlalchemy.ext.asyncio import AsyncSession

from service.audit.recorder import PendingEntry, insert_entries, record_audit
from service.core.request_context import SOURCE
from service.core.settings import Settings
from service.jobs import JobContext, JobKind, enqueue
from service.jobs.kinds import JobSteps, register
from service.records.grant_predicate import GrantFilter
from service.records.repository import GrantMatch, RecordRepository
from service.records.resource_types import STORED_TYPES
from service.store.tables import SubscriptionDeliveryState, SubscriptionRow
from service.subscriptions.backport import EMPTY, EVENT_NOTIFICATION, HANDSHAKE
from service.subscriptions.delivery_audit import (
    event_delivery_records,
    handshake_record,
    notification_outcome_record,
)
from service.subscriptions.delivery_rows import (
    channel_of,
    claim_sending,
    lock_delivery,
    release_claim,
    touch,
    utcnow,
)
from service.subscriptions.heartbeat import schedule_heartbeat
from service.subscriptions.notification import NotifiedEvent, SubscriptionState, notification_bundle
from service.subscriptions.outbox import DELIVERY_KIND, DeliveryPayload
from service.subscriptions.repository import EventRow, SubscriptionRepository
from service.subscriptions.sender import DELIVERED, Channel, new_client, post_notification
from service.subscriptions.task_gate import TASK_TOPICS, tasks_still_owned
from service.subscriptions.topics import Topic

log = logging.getLogger("mhr.subscriptions")

# Per job at most this many notifications; the rest goes to a follow-on job, so that one busy
# subscription does not hold a worker for long.
MAX_NOTIFICATIONS_PER_JOB = 20
# Without the subscriber's maxCount: a receiver catching up after an outage gets its backlog
# in notifications of this many events (each still numbered; receivers deduplicate by number).
# Each notification costs two short transactions and a round trip, whatever it carries: at 50
# events each, an intake of 15 exams/s (~20 resources each, ~300 events/s) needed six a second
# and the sender fell behind; at 500 one carries more than a second of such an intake (id-only:
# about 0.3 kB an event). A receiver that wants smaller ones sets maxCount.
DEFAULT_EVENTS_PER_NOTIFICATION = 500
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
    return SubscriptionState(row.id, row.topic, row.status, max(row.events_issued, latest_event), row.error)


def _focus_reference(event: EventRow) -> str:
    base = f"{event.focus_type}/{event.focus_id}"
    return base if event.focus_version is None else f"{base}/_history/{event.focus_version}"


@dataclass
class Locked:
    """One step's view: its session, the subscription and its locked delivery state."""

    session: AsyncSession
    row: SubscriptionRow
    state: SubscriptionDeliveryState


def hold_seconds(settings: Settings) -> float:
    """How long a claim (and the job's lease) must hold from one step to the next: the longest a
    POST may take, plus the lease for the database work around it."""
    return settings.job_lease_seconds + settings.subscription_timeout_seconds


class Delivery:
    """One job's run over one subscription it has claimed."""

    def __init__(
        self,
        job: JobContext[DeliveryPayload],
        steps: JobSteps,
        client: httpx.AsyncClient,
        channel: Channel,
        token: str,
    ) -> None:
        self.job = job
        self.steps = steps
        self.client = client
        self.channel = channel
        self.token = token
        self.subscription_id = job.payload.subscription_id
        self.fhir_base = job.runtime.settings.fhir_base_url
        self.policy = RetryPolicy.from_settings(job.runtime.settings)
        self.hold = hold_seconds(job.runtime.settings)
        self.request_id = f"job-{job.job_id}"

    @asynccontextmanager
    async def step(self) -> AsyncIterator[Locked | None]:
        """A short transaction on the locked state row, renewing our claim; None if the claim is
        no longer ours (taken over after it ran out: the new holder does the rest)."""
        async with self.steps.step(self.hold) as session:
            locked = await lock_delivery(session, self.subscription_id)
            if locked is None or locked[1].claim_token != self.token:
                yield None
                return
            row, state = locked
            state.claimed_until = utcnow() + timedelta(seconds=self.hold)
            yield Locked(session, row, state)

    async def handshake(self, row: SubscriptionRow) -> bool:
        """Send the handshake; True if the subscription is active after it."""
        now = utcnow()
        bundle = notification_bundle(self.fhir_base, _state(row), HANDSHAKE, now=now)
        outcome = await post_notification(self.client, self.channel, bundle)
        async with self.step() as locked:
            if locked is None:
                return False
            row, state = locked.row, locked.state
            await record_audit(
                locked.session, handshake_record(row, outcome), request_id=self.request_id, source=SOURCE
            )
            state.last_outcome = outcome
            if outcome == DELIVERED:
                row.status, row.error = "active", None
                state.last_sent_at = now
                state.failing_since, state.failures, state.retry_at = None, 0, None
            else:
                row.status, row.error = "error", f"handshake failed ({outcome})"
            touch(row, now)
            log.info(
                "subscription handshake",
                extra={"subscription_id": row.id, "outcome": outcome, "status": row.status},
            )
            return row.status == "active"

    async def _permits(
        self, session: AsyncSession, row: SubscriptionRow, events: list[EventRow], at: datetime
    ) -> list[tuple[EventRow, GrantMatch | None]]:
        """The events the organization may be told of now, each with the grant that admits it."""
        if row.topic in TASK_TOPICS:
            owned = await tasks_still_owned(session, row.organization_id, [e.focus_id for e in events])
            return [(e, None) for e in events if e.focus_id in owned]
        if row.topic != Topic.record_visible.value:
            return [(e, None) for e in events]  # a Consent withdrawn: told whatever grants say now
        # One statement for the notification's events, by the predicate of every read.
        grants = await RecordRepository(session).permits_for_versions(
            (
                (e.focus_type, e.focus_id, e.focus_version)
                for e in events
                if e.focus_type in STORED_TYPES and e.focus_version is not None
            ),
            GrantFilter(row.organization_id, row.purpose, at),
        )
        permitted: list[tuple[EventRow, GrantMatch | None]] = []
        for event in events:
            if event.focus_version is None:
                continue
            grant = grants.get((event.focus_type, event.focus_id, event.focus_version))
            if grant is not None:
                permitted.append((event, grant))
        return permitted

    async def push_pending(self) -> bool:
        """Send pending events until none is left or one fails; True if some may be left."""
        for _ in range(MAX_NOTIFICATIONS_PER_JOB):
            async with self.step() as locked:
                if locked is None:
                    return False
                row = locked.row
                if row.status != "active":
                    return False  # set off, or put in error, meanwhile
                per_notification = row.max_count or DEFAULT_EVENTS_PER_NOTIFICATION
                id_only = row.payload_content != EMPTY
                # No upper bound: events committed while this job runs are delivered by it too.
                pending = await SubscriptionRepository(locked.session).events(
                    row.id, row.events_delivered + 1, MAX_EVENT_NUMBER, per_notification
                )
                if not pending:
                    return False
                sent = await self._permits(locked.session, row, pending, utcnow())
                through = pending[-1].event_number
                if not sent:
                    # All withheld (no consent now): these numbers are done, nothing left.
                    row.events_delivered = through
                    self._log(row.id, through, 0, len(pending))
                    continue
                bundle = notification_bundle(
                    self.fhir_base,
                    _state(row, through),
                    EVENT_NOTIFICATION,
                    [
                        NotifiedEvent(e.event_number, e.occurred_at, _focus_reference(e) if id_only else None)
                        for e, _ in sent
                    ],
                    row.payload_content,
                )
                # The disclosure is on the trail, committed, before anything leaves.
                await insert_entries(
                    locked.session,
                    [
                        PendingEntry(record, self.request_id, SOURCE)
                        for record in event_delivery_records(row, sent, id_only=id_only)
                    ],
                )
            outcome = await post_notification(self.client, self.channel, bundle)
            async with self.step() as locked:
                if locked is None:
                    return False
                row, state = locked.row, locked.state
                numbers = [e.event_number for e, _ in sent]
                await record_audit(
                    locked.session,
                    notification_outcome_record(row, numbers, outcome),
                    request_id=self.request_id,
                    source=SOURCE,
                )
                state.last_outcome = outcome
                if outcome != DELIVERED:
                    await self._failed(locked, outcome, utcnow())
                    return False
                state.last_sent_at = utcnow()
                state.failing_since, state.failures, state.retry_at = None, 0, None
                # Delivered (and any withheld among them): these numbers are done.
                row.events_delivered = max(row.events_delivered, through)
                self._log(row.id, through, len(sent), len(pending) - len(sent))
        return True  # the job's share is used up: a follow-on job goes on from the cursor

    @staticmethod
    def _log(subscription_id: str, through: int, sent: int, withheld: int) -> None:
        log.info(
            "subscription events delivered",
            extra={
                "subscription_id": subscription_id,
                "through_event": through,
                "sent": sent,
                "withheld": withheld,
            },
        )

    async def _failed(self, locked: Locked, outcome: str, now: datetime) -> None:
        state, row = locked.state, locked.row
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
            locked.session, DELIVERY, DeliveryPayload(subscription_id=row.id), key, run_after=retry_at
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

    async def let_go(self, more: bool) -> None:
        """Release the claim; queue a follow-on if events are left (looked for under the row lock,
        so that an event whose job found us sending is never left behind)."""
        async with self.step() as locked:
            if locked is None:
                return
            row, state = locked.row, locked.state
            release_claim(state, self.token)
            if row.status == "active" and state.retry_at is None:
                if not more:
                    left = await SubscriptionRepository(locked.session).events(
                        row.id, row.events_delivered + 1, MAX_EVENT_NUMBER, 1
                    )
                    more = bool(left)
                if more:
                    key = f"{row.id}:after:{row.events_delivered}"
                    await enqueue(locked.session, DELIVERY, DeliveryPayload(subscription_id=row.id), key)
            await schedule_heartbeat(locked.session, row, state)


async def _run(job: JobContext[DeliveryPayload], steps: JobSteps) -> None:
    subscription_id = job.payload.subscription_id
    token = secrets.token_hex(16)
    hold = hold_seconds(job.runtime.settings)
    async with steps.step(hold) as session:
        locked = await lock_delivery(session, subscription_id)
        if locked is None:
            return  # deleted with its events: nothing to deliver
        row, state = locked
        if row.status not in ("requested", "active"):
            return  # error or off: events are kept for $events; the authority re-activates
        if row.status == "active" and state.retry_at is not None and utcnow() < state.retry_at:
            return  # backing off: the retry job due then does the work
        busy_until = await claim_sending(session, state, job.job_id, token, hold)
        if busy_until is not None:
            # Another job is sending and takes these events too; should it die, this one is due
            # when its claim runs out (one per claim, however many jobs found it busy).
            key = f"{row.id}:claim:{state.claim_token}"
            await enqueue(
                session, DELIVERY, DeliveryPayload(subscription_id=row.id), key, run_after=busy_until
            )
            return
        channel = channel_of(row, job)
        requested = row.status == "requested"
    async with new_client() as client:
        delivery = Delivery(job, steps, client, channel, token)
        active = await delivery.handshake(row) if requested else True
        more = await delivery.push_pending() if active else False
        await delivery.let_go(more)


DELIVERY = register(
    JobKind(
        name=DELIVERY_KIND,
        payload_type=DeliveryPayload,
        run_in_steps=_run,
        # A failed POST is not a failed job (the retry above is a job of its own); attempts are
        # spent only by crashes and database errors.
        max_attempts=20,
        backoff_base_seconds=2.0,
        backoff_cap_seconds=300.0,
    )
)

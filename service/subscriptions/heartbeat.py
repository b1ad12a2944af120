"""Heartbeats: a ``heartbeat`` notification when an active subscription heard nothing for its
``heartbeatPeriod``, so that a receiver can tell silence from a broken channel.

Each subscription with a period has one chain of ``subscription-heartbeat`` jobs, each due at
the next moment a heartbeat may be owed (the last accepted notification + the period) and
keyed by that moment, so the chain survives restarts (the jobs are durable) and two paths that
schedule the same moment make one job. A heartbeat job that finds the subscription gone, not
active, or without a period ends the chain; one that finds a notification was sent meanwhile
moves on to the new moment. No heartbeat is sent while event delivery is backing off (the
retry is the news); a failed heartbeat is logged and the chain goes on.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from service.jobs import JobContext, JobKind, enqueue
from service.jobs.kinds import JobPayload, JobSteps, register
from service.store.tables import SubscriptionDeliveryState, SubscriptionRow
from service.subscriptions.backport import HEARTBEAT
from service.subscriptions.delivery_rows import channel_of, lock_delivery, utcnow
from service.subscriptions.notification import SubscriptionState, notification_bundle
from service.subscriptions.sender import DELIVERED, new_client, post_notification

log = logging.getLogger("mhr.subscriptions")

HEARTBEAT_KIND = "subscription-heartbeat"


class HeartbeatPayload(JobPayload):
    subscription_id: str


async def schedule_heartbeat(
    session: AsyncSession, row: SubscriptionRow, state: SubscriptionDeliveryState
) -> None:
    """Queue the heartbeat job for the next moment one may be owed (idempotent per moment)."""
    if row.status != "active" or not row.heartbeat_seconds:
        return
    now = utcnow()
    due = (state.last_sent_at or now) + timedelta(seconds=row.heartbeat_seconds)
    if due <= now:
        due = now
    key = f"{row.id}:{int(due.timestamp())}"
    await enqueue(session, HEARTBEAT_JOB, HeartbeatPayload(subscription_id=row.id), key, run_after=due)


async def _run(job: JobContext[HeartbeatPayload], steps: JobSteps) -> None:
    """Decide in one short transaction, POST with none open, record in another (as delivery
    does: a slow receiver holds no lock, on SQLite not the only write lock)."""
    hold = job.runtime.settings.job_lease_seconds + job.runtime.settings.subscription_timeout_seconds
    subscription_id = job.payload.subscription_id
    async with steps.step(hold) as session:
        locked = await lock_delivery(session, subscription_id)
        if locked is None:
            return  # deleted: the chain ends
        row, state = locked
        if row.status != "active" or not row.heartbeat_seconds:
            return  # the chain ends; activation starts a new one
        now = utcnow()
        period = timedelta(seconds=row.heartbeat_seconds)
        owed = state.last_sent_at is None or state.last_sent_at + period <= now
        if not owed or state.retry_at is not None:
            await schedule_heartbeat(session, row, state)
            return
        status = SubscriptionState(row.id, row.topic, row.status, row.events_issued, row.error)
        bundle = notification_bundle(job.runtime.settings.fhir_base_url, status, HEARTBEAT, now=now)
        channel = channel_of(row, job)
    async with new_client() as client:
        outcome = await post_notification(client, channel, bundle)
    async with steps.step(hold) as session:
        locked = await lock_delivery(session, subscription_id)
        if locked is None:
            return
        row, state = locked
        # Sent or lost (a heartbeat is not retried: the next one is a period later).
        state.last_sent_at = max(now, state.last_sent_at) if state.last_sent_at else now
        state.last_outcome = outcome
        if outcome != DELIVERED:
            log.warning(
                "subscription heartbeat failed", extra={"subscription_id": row.id, "outcome": outcome}
            )
        await schedule_heartbeat(session, row, state)


HEARTBEAT_JOB = register(
    JobKind(name=HEARTBEAT_KIND, payload_type=HeartbeatPayload, run_in_steps=_run, max_attempts=20)
)

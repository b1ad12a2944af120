"""The rows a delivery or heartbeat job works on: the locked subscription, its delivery state,
and its channel (endpoint and decrypted headers, in memory for one job only)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from service.jobs import JobContext
from service.store.tables import SubscriptionDeliveryState, SubscriptionRow
from service.subscriptions.headers import open_headers
from service.subscriptions.sender import Channel


def utcnow() -> datetime:
    return datetime.now(UTC)


async def lock_delivery(
    session: AsyncSession, subscription_id: str
) -> tuple[SubscriptionRow, SubscriptionDeliveryState] | None:
    """The subscription and its delivery state, the state row locked until the job's transaction
    ends, so that one job at a time pushes this subscription (in order). None if it is gone.

    The lock is on the delivery state, not on the subscription: an intake that publishes an event
    bumps the subscription's event counter. Delivery holds it only for short transactions (no
    POST in flight): across its POSTs a delivery holds a claim instead (:func:`claim_sending`).
    """
    exists = await session.execute(select(SubscriptionRow.id).where(SubscriptionRow.id == subscription_id))
    if exists.first() is None:
        return None
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    await session.execute(
        dialect.insert(SubscriptionDeliveryState)
        .values(subscription_id=subscription_id, failures=0)
        .on_conflict_do_nothing(index_elements=["subscription_id"])
    )
    state = (
        await session.execute(
            select(SubscriptionDeliveryState)
            .where(SubscriptionDeliveryState.subscription_id == subscription_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalar_one()
    # Read after the lock: what the job that held it before us committed.
    row = (
        await session.execute(
            select(SubscriptionRow)
            .where(SubscriptionRow.id == subscription_id)
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()
    return None if row is None else (row, state)


async def claim_sending(
    session: AsyncSession, state: SubscriptionDeliveryState, job_id: int, token: str, hold_seconds: float
) -> datetime | None:
    """Take (or renew) the claim to send this subscription's notifications, on the locked state
    row. None when taken; otherwise the moment another job's live claim runs out."""
    now = utcnow()
    others = state.claim_job_id is not None and state.claim_job_id != job_id
    if others and state.claimed_until is not None and state.claimed_until > now:
        return state.claimed_until
    state.claim_job_id, state.claim_token = job_id, token
    state.claimed_until = now + timedelta(seconds=hold_seconds)
    return None


def release_claim(state: SubscriptionDeliveryState, token: str) -> None:
    if state.claim_token == token:
        state.claim_job_id, state.claim_token, state.claimed_until = None, None, None


def channel_of(row: SubscriptionRow, job: JobContext[Any]) -> Channel:
    settings = job.runtime.settings
    timeout = settings.subscription_timeout_seconds
    if row.timeout_seconds is not None:
        timeout = min(timeout, float(row.timeout_seconds))
    return Channel(
        endpoint=row.endpoint,
        headers=tuple(open_headers(job.runtime.keys, row.id, row.headers_sealed)),
        payload_type=row.payload_type,
        timeout_seconds=timeout,
        connect_timeout_seconds=settings.subscription_connect_timeout_seconds,
    )


def touch(row: SubscriptionRow, now: datetime) -> None:
    """A status the service changed is a new version of the resource the authority reads."""
    row.version_id += 1
    row.last_updated = now

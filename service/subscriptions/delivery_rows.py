"""The rows a delivery or heartbeat job works on: the locked subscription, its delivery state,
and its channel (endpoint and decrypted headers, in memory for one job only)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from service.jobs import JobContext
from service.store.tables import SubscriptionDeliveryState, SubscriptionRow
from service.subscriptions.headers import open_headers
from service.subscriptions.sender import Channel


def utcnow() -> datetime:
    return datetime.now(UTC)


async def lock_subscription(session: AsyncSession, subscription_id: str) -> SubscriptionRow | None:
    """The subscription, row-locked until the job's transaction ends (PostgreSQL; SQLite's
    transaction already holds its only write lock)."""
    found = await session.execute(
        select(SubscriptionRow).where(SubscriptionRow.id == subscription_id).with_for_update()
    )
    return found.scalar_one_or_none()


async def delivery_state(session: AsyncSession, subscription_id: str) -> SubscriptionDeliveryState:
    state = await session.get(SubscriptionDeliveryState, subscription_id)
    if state is None:
        state = SubscriptionDeliveryState(subscription_id=subscription_id, failures=0)
        session.add(state)
        await session.flush()
    return state


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

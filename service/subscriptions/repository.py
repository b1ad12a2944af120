"""SQL for subscriptions and their events. No HTTP, no rules."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, delete, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from service.store.tables import SubscriptionEvent, SubscriptionRow

# Statuses under which new events are recorded: a subscription in error keeps collecting them
# for $events (and for delivery once it is active again); one set off does not.
RECORDING = ("requested", "active", "error")
_INSERT_EVENTS = insert(cast(Table, SubscriptionEvent.__table__))


@dataclass(frozen=True)
class Recipient:
    """A subscription an event fans out to."""

    subscription_id: str
    organization_id: str
    purpose: str


@dataclass(frozen=True)
class EventRow:
    subscription_id: str
    event_number: int
    occurred_at: datetime
    focus_type: str
    focus_id: str
    focus_version: int | None
    subject_id: str | None


class SubscriptionRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # --- the resource ----------------------------------------------------------------
    async def add(self, row: SubscriptionRow) -> None:
        self.session.add(row)
        await self.session.flush()

    async def get(self, subscription_id: str, organization_id: str | None = None) -> SubscriptionRow | None:
        """One subscription; with ``organization_id``, only if that organization owns it."""
        query = select(SubscriptionRow).where(SubscriptionRow.id == subscription_id)
        if organization_id is not None:
            query = query.where(SubscriptionRow.organization_id == organization_id)
        return (await self.session.execute(query)).scalar_one_or_none()

    async def get_for_update(self, subscription_id: str, organization_id: str) -> SubscriptionRow | None:
        query = (
            select(SubscriptionRow)
            .where(SubscriptionRow.id == subscription_id, SubscriptionRow.organization_id == organization_id)
            .with_for_update()
        )
        return (await self.session.execute(query)).scalar_one_or_none()

    async def search(
        self,
        organization_id: str,
        *,
        ids: Sequence[str] = (),
        statuses: Sequence[str] = (),
        topics: Sequence[str] = (),
        limit: int,
    ) -> tuple[list[SubscriptionRow], int]:
        """The organization's subscriptions (oldest first), up to ``limit``, and how many match."""
        where: list[Any] = [SubscriptionRow.organization_id == organization_id]
        if ids:
            where.append(SubscriptionRow.id.in_(ids))
        if statuses:
            where.append(SubscriptionRow.status.in_(statuses))
        if topics:
            where.append(SubscriptionRow.topic.in_(topics))
        total = (
            await self.session.execute(select(func.count()).select_from(SubscriptionRow).where(*where))
        ).scalar_one()
        rows = await self.session.execute(
            select(SubscriptionRow)
            .where(*where)
            .order_by(SubscriptionRow.created_at, SubscriptionRow.id)
            .limit(limit)
        )
        return list(rows.scalars()), int(total)

    async def delete(self, row: SubscriptionRow) -> None:
        # Its events go with it (ON DELETE CASCADE; deleted explicitly too, for clarity on SQLite).
        await self.session.execute(
            delete(SubscriptionEvent).where(SubscriptionEvent.subscription_id == row.id)
        )
        await self.session.delete(row)
        await self.session.flush()

    # --- events ----------------------------------------------------------------------
    async def recipients(self, topic: str, organization_ids: Iterable[str]) -> list[Recipient]:
        """Subscriptions recording events of ``topic`` for these organizations, by id."""
        orgs = sorted(set(organization_ids))
        if not orgs:
            return []
        rows = await self.session.execute(
            select(SubscriptionRow.id, SubscriptionRow.organization_id, SubscriptionRow.purpose)
            .where(
                SubscriptionRow.topic == topic,
                SubscriptionRow.organization_id.in_(orgs),
                SubscriptionRow.status.in_(RECORDING),
                # Past its end a subscription records nothing more (its events stay for $events).
                or_(SubscriptionRow.end_at.is_(None), SubscriptionRow.end_at > datetime.now(UTC)),
            )
            .order_by(SubscriptionRow.id)
        )
        return [Recipient(r.id, r.organization_id, r.purpose) for r in rows]

    async def any_recording(self, topic: str) -> bool:
        """Whether any subscription records ``topic`` (so that a write concerning nobody costs one query)."""
        found = await self.session.execute(
            select(SubscriptionRow.id)
            .where(SubscriptionRow.topic == topic, SubscriptionRow.status.in_(RECORDING))
            .limit(1)
        )
        return found.first() is not None

    async def issue_numbers(self, subscription_id: str, count: int) -> int:
        """Reserve ``count`` event numbers; returns the last. The update row-locks the subscription
        until the transaction ends, so concurrent writers number its events in commit order, with
        no gap and no repeat."""
        result = await self.session.execute(
            update(SubscriptionRow)
            .where(SubscriptionRow.id == subscription_id)
            .values(events_issued=SubscriptionRow.events_issued + count)
            .returning(SubscriptionRow.events_issued)
        )
        return int(result.scalar_one())

    async def add_events(self, rows: Sequence[dict[str, object]]) -> None:
        if rows:
            await self.session.execute(_INSERT_EVENTS, list(rows))

    async def events(self, subscription_id: str, since: int, until: int, limit: int) -> list[EventRow]:
        """Events numbered ``since`` .. ``until`` (both included), in order, at most ``limit``."""
        rows = await self.session.execute(
            select(SubscriptionEvent)
            .where(
                SubscriptionEvent.subscription_id == subscription_id,
                SubscriptionEvent.event_number >= since,
                SubscriptionEvent.event_number <= until,
            )
            .order_by(SubscriptionEvent.event_number)
            .limit(limit)
        )
        return [
            EventRow(
                e.subscription_id,
                e.event_number,
                e.occurred_at,
                e.focus_type,
                e.focus_id,
                e.focus_version,
                e.subject_id,
            )
            for e in rows.scalars()
        ]

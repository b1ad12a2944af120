"""Which task events may still go out: the one rule for delivery and for ``$events``.

A task event names the authority's own Task, so record grants do not decide it; ownership
does. A task transferred to another authority since the event, or ended by a withdrawn
consent (cancelled), is no longer the subscriber's to hear about: the event keeps its number
and is not shown, as a withheld record event is not.
"""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from service.store.tables import FollowupTask
from service.subscriptions.topics import Topic

TASK_TOPICS = frozenset({Topic.task_assigned.value, Topic.task_overdue.value})


async def tasks_still_owned(session: AsyncSession, organization_id: str, task_ids: Iterable[str]) -> set[str]:
    """The ids among ``task_ids`` that ``organization_id`` owns now, in a state it may act on."""
    wanted = sorted(set(task_ids))
    if not wanted:
        return set()
    found = await session.scalars(
        sa.select(FollowupTask.id).where(
            FollowupTask.id.in_(wanted),
            FollowupTask.owner_org == organization_id,
            FollowupTask.status != "cancelled",
        )
    )
    return set(found)

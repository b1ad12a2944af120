"""SQL on the follow-up tables, and the few record lookups the task rules need. No HTTP here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from service.store.tables import DisclosureGrant, FollowupTask, FollowupTransfer, Organization, Subject
from service.tasks.transitions import OPEN


@dataclass(frozen=True)
class Worklist:
    """A worklist query, already reduced to columns."""

    owner_org: str | None = None
    requester_org: str | None = None
    statuses: Sequence[str] = ()
    subject_id: str | None = None
    code: str | None = None
    due_from: date | None = None  # period: due date within [due_from, due_to]
    due_to: date | None = None
    offset: int = 0
    limit: int = 20


def _not_erased() -> Any:
    erased = select(Subject.id).where(Subject.id == FollowupTask.subject_id, Subject.erased_at.is_not(None))
    return ~erased.exists()


class TaskRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, task_id: str, *, for_update: bool = False) -> FollowupTask | None:
        statement = select(FollowupTask).where(FollowupTask.id == task_id)
        if for_update:
            statement = statement.with_for_update()
        return (await self.session.execute(statement)).scalar_one_or_none()

    async def by_response(self, response_id: str) -> FollowupTask | None:
        result = await self.session.execute(
            select(FollowupTask).where(FollowupTask.outcome_response_id == response_id)
        )
        return result.scalar_one_or_none()

    async def for_subject(self, subject_id: str) -> list[FollowupTask]:
        result = await self.session.execute(
            select(FollowupTask).where(FollowupTask.subject_id == subject_id).order_by(FollowupTask.id)
        )
        return list(result.scalars())

    async def add(self, task: FollowupTask) -> None:
        self.session.add(task)
        await self.session.flush()

    async def add_transfer(self, task_id: str, from_org: str, to_org: str, at: datetime) -> None:
        self.session.add(FollowupTransfer(task_id=task_id, from_org=from_org, to_org=to_org, at=at))
        await self.session.flush()

    async def transfers(self, task_id: str) -> list[FollowupTransfer]:
        result = await self.session.execute(
            select(FollowupTransfer).where(FollowupTransfer.task_id == task_id).order_by(FollowupTransfer.id)
        )
        return list(result.scalars())

    async def granted_authorities(self, subject_id: str) -> dict[str, set[str]]:
        """The authorities any of this migrant's disclosure grants name, with the grants' purposes.

        Only candidates: whether one may see a given version now is the grant predicate's call.
        """
        result = await self.session.execute(
            select(DisclosureGrant.organization_id, DisclosureGrant.purpose)
            .join(Organization, Organization.id == DisclosureGrant.organization_id)
            .where(DisclosureGrant.subject_id == subject_id, Organization.kind == "authority")
            .distinct()
        )
        found: dict[str, set[str]] = {}
        for organization_id, purpose in result:
            found.setdefault(organization_id, set()).add(purpose)
        return found

    async def grant_purposes(self, subject_id: str, organization_id: str) -> set[str]:
        result = await self.session.execute(
            select(DisclosureGrant.purpose)
            .where(
                DisclosureGrant.subject_id == subject_id, DisclosureGrant.organization_id == organization_id
            )
            .distinct()
        )
        return set(result.scalars())

    async def organization_kind(self, organization_id: str) -> str | None:
        result = await self.session.execute(
            select(Organization.kind).where(Organization.id == organization_id, Organization.active.is_(True))
        )
        return result.scalar_one_or_none()

    async def worklist(self, query: Worklist) -> tuple[list[FollowupTask], int]:
        """One page of tasks (due date, then id) and how many match in all."""
        # An erased migrant's tasks are gone with the key: no worklist shows them.
        conditions = [_not_erased()]
        if query.owner_org is not None:
            conditions.append(FollowupTask.owner_org == query.owner_org)
        if query.requester_org is not None:
            conditions.append(FollowupTask.requester_org == query.requester_org)
        if query.statuses:
            conditions.append(FollowupTask.status.in_(list(query.statuses)))
        if query.subject_id is not None:
            conditions.append(FollowupTask.subject_id == query.subject_id)
        if query.code is not None:
            conditions.append(FollowupTask.code == query.code)
        if query.due_from is not None:
            conditions.append(FollowupTask.due_date >= query.due_from)
        if query.due_to is not None:
            conditions.append(FollowupTask.due_date <= query.due_to)
        total = (
            await self.session.execute(select(func.count()).select_from(FollowupTask).where(*conditions))
        ).scalar_one()
        page = await self.session.execute(
            select(FollowupTask)
            .where(*conditions)
            .order_by(FollowupTask.due_date, FollowupTask.id)
            .offset(query.offset)
            .limit(query.limit)
        )
        return list(page.scalars()), int(total)

    async def newly_overdue(self, today: date, limit: int) -> list[FollowupTask]:
        """Open tasks past their due date that have not been raised as overdue for it yet."""
        result = await self.session.execute(
            select(FollowupTask)
            .where(
                FollowupTask.status.in_(sorted(OPEN)),
                FollowupTask.due_date < today,
                FollowupTask.overdue_at.is_(None),
                _not_erased(),
            )
            .order_by(FollowupTask.due_date, FollowupTask.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return list(result.scalars())

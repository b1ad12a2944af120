"""The counts, in SQL, over the follow-up tasks' non-identifying columns.

One organization, one period, one query for the counts and one for the median; no row leaves
the database, only aggregates. Who belongs to whose figures:

- *authority* (``owner_org``): the tasks it owns, plus those it transferred away (they stay in
  its cohort as transferred; an evaluation after the transfer is the new owner's, not its own);
- *clinic organization* (``requester_org``): the tasks of the migrants it examined, evaluated by
  whichever authority; transferred means transferred at least once.

A case belongs to the period its clock start falls in: the arrival date the authority
recorded, else the UTC date the task was authored (the task is authored at disclosure, on or
before arrival, so the fallback never flatters an authority). Days to evaluation are counted
from the clock start; an evaluation dated before it counts as 0 days.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from service.figures.counts import WINDOWS, CompletionFigures, Perspective
from service.figures.period import Period
from service.figures.sql_dates import days_between, utc_date
from service.store.tables import FollowupTask, FollowupTransfer

# The follow-up tables (owned by service.tasks); only their non-identifying columns are read.
_tasks = FollowupTask.__table__
_transfers = FollowupTransfer.__table__

LOST_STATUS = ("failed", "lost-to-follow-up")
NOT_A_CASE = "entered-in-error"  # Task.status  # (Task.status, Task.businessStatus)
# service.tasks records an evaluated case's outcome as "confirmed" or "revised" (the receiving
# country's evaluation against the overseas classification): an evaluated case is one or the other.
CONFIRMING_OUTCOMES = ("confirmed",)


def _cohort(organization: str, perspective: Perspective, period: Period) -> sa.Subquery:
    """One row per case of the organization's figures, with what the counts need to know."""
    t = _tasks
    clock_start = sa.func.coalesce(t.c.arrival_date, utc_date(t.c.authored_at))
    # A task entered in error was never a case; a cancelled one (consent withdrawn) was, unevaluated.
    in_period = sa.and_(clock_start >= period.start, clock_start < period.end, t.c.status != NOT_A_CASE)

    def cases(
        member: sa.ColumnElement[bool], transferred: sa.ColumnElement[bool], evaluation_counts: bool
    ) -> sa.Select[Any]:
        counted = t.c.evaluated_on.is_not(None) if evaluation_counts else sa.false()
        elapsed = days_between(t.c.evaluated_on, clock_start)
        days = sa.case((sa.not_(counted), sa.null()), (elapsed < 0, 0), else_=elapsed)
        lost = sa.and_(t.c.status == LOST_STATUS[0], t.c.business_status == LOST_STATUS[1])
        return sa.select(
            days.label("days"),
            sa.case((transferred, 1), else_=0).label("transferred"),
            sa.case((lost, 1), else_=0).label("lost"),
            sa.case((t.c.arrival_date.is_(None), 1), else_=0).label("arrival_unknown"),
            sa.case((sa.and_(counted, t.c.outcome.in_(CONFIRMING_OUTCOMES)), 1), else_=0).label("confirmed"),
        ).where(member, in_period)

    if perspective is Perspective.clinic:
        transferred = t.c.id.in_(sa.select(_transfers.c.task_id))
        return cases(t.c.requester_org == organization, transferred, True).subquery("cohort")
    # An authority: what it owns, and (a second branch, so that each can use its index) what it
    # transferred away and no longer owns.
    away = t.c.id.in_(sa.select(_transfers.c.task_id).where(_transfers.c.from_org == organization))
    owned = cases(t.c.owner_org == organization, sa.false(), True)
    given_away = cases(sa.and_(t.c.owner_org != organization, away), sa.true(), False)
    return sa.union_all(owned, given_away).subquery("cohort")


def _count_where(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[Any]:
    return sa.func.coalesce(sa.func.sum(sa.case((condition, 1), else_=0)), 0)


async def completion_figures(
    session: AsyncSession, organization: str, perspective: Perspective, period: Period
) -> CompletionFigures:
    cohort = _cohort(organization, perspective, period)
    days = cohort.c.days
    windows = [_count_where(days <= limit).label(group.value) for group, limit in WINDOWS.items()]
    row = (
        await session.execute(
            sa.select(
                sa.func.count().label("cases"),
                sa.func.count(days).label("evaluated"),
                *windows,
                sa.func.coalesce(sa.func.sum(cohort.c.lost), 0).label("lost"),
                sa.func.coalesce(sa.func.sum(cohort.c.transferred), 0).label("transferred"),
                sa.func.coalesce(sa.func.sum(cohort.c.arrival_unknown), 0).label("arrival_unknown"),
                sa.func.coalesce(sa.func.sum(cohort.c.confirmed), 0).label("confirmed"),
            )
        )
    ).one()
    evaluated = int(row.evaluated)
    confirmed = int(row.confirmed)
    return CompletionFigures(
        cases=int(row.cases),
        evaluated=evaluated,
        within={group: int(row._mapping[group.value]) for group in WINDOWS},
        median_days=await _median_days(session, cohort) if evaluated else None,
        lost=int(row.lost),
        transferred=int(row.transferred),
        arrival_unknown=int(row.arrival_unknown),
        confirmed=confirmed,
        revised=evaluated - confirmed,
    )


async def _median_days(session: AsyncSession, cohort: sa.Subquery) -> float | None:
    """The median with window functions (SQLite has no percentile_cont): the middle one or two."""
    ranked = (
        sa.select(
            cohort.c.days,
            sa.func.row_number().over(order_by=cohort.c.days).label("position"),
            sa.func.count().over().label("total"),
        )
        .where(cohort.c.days.is_not(None))
        .subquery("ranked")
    )
    middle = sa.select(sa.func.avg(ranked.c.days)).where(
        ranked.c.position.in_([(ranked.c.total + 1) // 2, (ranked.c.total + 2) // 2])
    )
    value = (await session.execute(middle)).scalar_one()
    return None if value is None else float(value)

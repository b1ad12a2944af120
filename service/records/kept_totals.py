"""An authority's search total of one resource type, at a cost that does not grow with the store.

Each disclosure grant keeps how many current resources it admits while in force
(``disclosure_grants.current_matches``). The total an authority's unfiltered search reports is
the sum of that over its grants in force now. Summed grant by grant, that is a scan of every
permitted migrant's grants (at 100k exams, about 100x its cost at 1k); here it is three parts,
read in one statement (one snapshot, so that a concurrent sweep or compaction is seen whole or
not at all):

- ``live``: the sum over the grants not yet retired, kept as additions in ``grant_totals`` by
  every transaction that changes a grant's count (:func:`record`), and folded into one row per
  (organization, purpose, type) by :func:`compact`;
- less those not yet begun (``valid_from`` after now: Consents dated ahead, rare), and
- less those already ended (``valid_to`` at or before now) that the sweep (:func:`retire_ended`)
  has not retired yet, each read from a partial index holding only live grants that admit
  something.

A grant's end only moves into the past, so once the sweep retires an ended grant (its count
leaves ``live`` in the same transaction) no later moment can need it again. The background work
of every process (``service.app.background``) sweeps and compacts every
``MAINTENANCE_SECONDS``; a total is exact whether or not it has run, and costs what has
happened since it last ran.

Additions are inserts only, never an update of a shared row: concurrent intakes of different
migrants never wait for each other here. Each writer first locks the grant rows it recounts
(``FOR UPDATE``), so that a concurrent sweep retires a grant either before the writer reads
its count (and the writer leaves it out) or after the writer has committed (and the sweep
subtracts the new count).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Table,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from service.records.grant_predicate import GRANTS
from service.store.database import Database
from service.store.tables import GrantTotal, UtcDateTime

# How often each process's background work sweeps ended grants and folds the additions.
MAINTENANCE_SECONDS = 10.0

Key = tuple[str, str, str]  # organization, purpose, resource type

TOTALS = cast(Table, GrantTotal.__table__)


def _live_and_admitting() -> Any:
    g = GRANTS
    return (g.c.current_matches > 0, g.c.retired_at.is_(None))


def _of_key(table: Table, organization_id: Any, purpose: Any, resource_type: Any) -> tuple[Any, ...]:
    """Rows of ``table`` (grants or totals) for one (organization, purpose, type): values or
    bound parameters."""
    return (
        table.c.organization_id == organization_id,
        table.c.purpose == purpose,
        table.c.resource_type == resource_type,
    )


# The audience's parameters (service.records.grant_predicate.Audience.params) and the type.
_BOUND_KEY: tuple[Any, ...] = (bindparam("grant_org"), bindparam("grant_purpose"), bindparam("resource_type"))


def _total_statement() -> Any:
    g, t = GRANTS, TOTALS
    at = bindparam("grant_at", type_=UtcDateTime())
    key = _of_key(g, *_BOUND_KEY)
    live = select(func.coalesce(func.sum(t.c.delta), 0)).where(*_of_key(t, *_BOUND_KEY)).scalar_subquery()
    not_begun = (
        select(func.coalesce(func.sum(g.c.current_matches), 0))
        .where(
            *key, *_live_and_admitting(), g.c.valid_from > at, or_(g.c.valid_to.is_(None), g.c.valid_to > at)
        )
        .scalar_subquery()
    )
    ended = (
        select(func.coalesce(func.sum(g.c.current_matches), 0))
        .where(*key, *_live_and_admitting(), g.c.valid_to <= at)
        .scalar_subquery()
    )
    return select(live - not_begun - ended)


TOTAL = _total_statement()


async def total(session: AsyncSession, params: dict[str, object]) -> int:
    """The sum of ``current_matches`` over the grants in force at ``grant_at`` for
    ``grant_org``, ``grant_purpose`` and ``resource_type`` (the audience's parameters)."""
    result = await session.execute(TOTAL, params)
    return int(result.scalar_one())


async def locked_counts(session: AsyncSession, subject_ids: Iterable[str]) -> Counter[Key]:
    """The live counts of these migrants' grants by key, their rows locked until commit."""
    g = GRANTS
    wanted = sorted(set(subject_ids))
    counts: Counter[Key] = Counter()
    for start in range(0, len(wanted), 500):
        result = await session.execute(
            select(g.c.organization_id, g.c.purpose, g.c.resource_type, g.c.current_matches, g.c.retired_at)
            .where(g.c.subject_id.in_(wanted[start : start + 500]))
            .order_by(g.c.id)  # one lock order for every writer
            .with_for_update()
        )
        counts.update(_live(result))
    return counts


def _live(rows: Iterable[Any]) -> Counter[Key]:
    counts: Counter[Key] = Counter()
    for organization_id, purpose, resource_type, matches, retired_at in rows:
        if retired_at is None and matches:
            counts[(organization_id, purpose, resource_type)] += matches
    return counts


async def delete_grants(session: AsyncSession, subject_id: str) -> tuple[int, Counter[Key]]:
    """Delete a migrant's grants: (how many, the live counts they took with them)."""
    g = GRANTS
    result = await session.execute(
        delete(g)
        .where(g.c.subject_id == subject_id)
        .returning(g.c.organization_id, g.c.purpose, g.c.resource_type, g.c.current_matches, g.c.retired_at)
    )
    rows = result.all()
    return len(rows), _live(rows)


async def record(session: AsyncSession, change: Counter[Key]) -> None:
    """Add a transaction's change of the live counts (zeros left out)."""
    rows = [
        {"organization_id": o, "purpose": p, "resource_type": t, "delta": d}
        for (o, p, t), d in sorted(change.items())
        if d
    ]
    if rows:
        await session.execute(insert(TOTALS), rows)


async def retire_ended(session: AsyncSession, now: datetime) -> int:
    """Retire the live grants that ended at or before ``now``; their counts leave ``live``."""
    g, t = GRANTS, TOTALS
    keys = (
        await session.execute(select(t.c.organization_id, t.c.purpose, t.c.resource_type).distinct())
    ).all()
    retired = 0
    change: Counter[Key] = Counter()
    for organization_id, purpose, resource_type in keys:
        # One key at a time, so that each sweep reads the partial index of ended grants. Rows a
        # writer holds are skipped (retired by a later sweep), and the rest are locked in id order
        # as every writer locks them: the sweep never waits for an intake, nor deadlocks with one.
        ended = (
            select(g.c.id)
            .where(
                *_of_key(g, organization_id, purpose, resource_type),
                *_live_and_admitting(),
                g.c.valid_to <= now,
            )
            .order_by(g.c.id)
            .with_for_update(skip_locked=True)
        )
        result = await session.execute(
            update(g)
            .where(g.c.id.in_(ended.scalar_subquery()))
            .values(retired_at=now)
            .returning(g.c.current_matches)
        )
        for (matches,) in result:
            change[(organization_id, purpose, resource_type)] -= matches
            retired += 1
    await record(session, change)
    return retired


# PostgreSQL, one statement: the rows it deletes are exactly those it sums, whatever commits
# meanwhile (a row committed after its snapshot is neither deleted nor summed).
_COMPACT_POSTGRESQL = text(
    "WITH gone AS (DELETE FROM grant_totals"
    " RETURNING organization_id, purpose, resource_type, delta)"
    " INSERT INTO grant_totals (organization_id, purpose, resource_type, delta)"
    " SELECT organization_id, purpose, resource_type, sum(delta) FROM gone"
    " GROUP BY organization_id, purpose, resource_type HAVING sum(delta) <> 0"
)


async def compact(session: AsyncSession) -> None:
    """Fold the additions into one row per key (a key whose sum is zero keeps no row)."""
    connection = await session.connection()
    if connection.dialect.name == "postgresql":
        await session.execute(_COMPACT_POSTGRESQL)
        return
    # SQLite: the transaction holds the single writer's lock (BEGIN IMMEDIATE) from its start.
    t = TOTALS
    columns = (t.c.organization_id, t.c.purpose, t.c.resource_type)
    sums = (await session.execute(select(*columns, func.sum(t.c.delta)).group_by(*columns))).all()
    await session.execute(delete(t))
    await record(session, Counter({(o, p, r): int(d) for o, p, r, d in sums}))


async def maintain(database: Database, now: datetime) -> int:
    """Sweep and compact, in one transaction; returns how many grants were retired."""
    async with database.transaction() as session:
        retired = await retire_ended(session, now)
        await compact(session)
    return retired

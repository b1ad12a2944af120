"""Auditor queries over the audit entries (SQL only; the API layer turns them into FHIR)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import ColumnElement, Select, and_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.audit.recorder import REF_ENTITY, REF_PATIENT, REF_RECIPIENT
from service.store.tables import AuditEntry, AuditRef, Client

DATE_PREFIXES = ("eq", "ge", "le", "gt", "lt")
_DATE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d{1,6}))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2}))?)?)?$"
)


class QueryError(ValueError):
    """A search parameter value that cannot be understood; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def date_range(value: str) -> tuple[str, datetime, datetime]:
    """``[prefix]date`` -> (prefix, start, end): the instant range its precision covers."""
    prefix = value[:2] if value[:2] in DATE_PREFIXES else "eq"
    text = value[2:] if value[:2] in DATE_PREFIXES else value
    match = _DATE.match(text)
    if not match:
        raise QueryError("date", "date must be YYYY, YYYY-MM, YYYY-MM-DD or a full dateTime with zone")
    try:
        year = int(match["y"])
        if match["m"] is None:
            start = datetime(year, 1, 1, tzinfo=UTC)
            end = datetime(year + 1, 1, 1, tzinfo=UTC)
        elif match["d"] is None:
            month = int(match["m"])
            start = datetime(year, month, 1, tzinfo=UTC)
            end = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=UTC)
        elif match["H"] is None:
            start = datetime(year, int(match["m"]), int(match["d"]), tzinfo=UTC)
            end = start + timedelta(days=1)
        else:
            stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
            start = stamp.astimezone(UTC)
            if match["f"] is not None:
                end = start + timedelta(microseconds=1)
            elif match["S"] is not None:
                end = start + timedelta(seconds=1)
            else:
                end = start + timedelta(minutes=1)
    except (ValueError, OverflowError) as exc:  # 2025-02-30; 9999-12-31 ends past the year 9999
        raise QueryError("date", "date is not a valid calendar date in years 1 to 9999") from exc
    return prefix, start, end


@dataclass(frozen=True)
class AuditQuery:
    dates: tuple[tuple[str, datetime, datetime], ...] = ()
    agents: tuple[str, ...] = ()  # client ids (the agent's identifier)
    # Organizations as agents: the acting client's organization, or a recipient.
    agent_organizations: tuple[str, ...] = ()
    entity: str | None = None
    patient: str | None = None
    actions: tuple[str, ...] = ()
    outcomes: tuple[str, ...] = ()
    event_types: tuple[str, ...] = ()

    def statement(self) -> Select[int, bytes, int | None]:
        stmt = select(AuditEntry.id, AuditEntry.content, AuditEntry.leaf_index)
        recorded = AuditEntry.recorded_at
        for prefix, start, end in self.dates:
            if prefix == "eq":
                stmt = stmt.where(recorded >= start, recorded < end)
            elif prefix == "ge":
                stmt = stmt.where(recorded >= start)
            elif prefix == "gt":
                stmt = stmt.where(recorded >= end)
            elif prefix == "le":
                stmt = stmt.where(recorded < end)
            else:  # lt
                stmt = stmt.where(recorded < start)
        if self.agents or self.agent_organizations:
            stmt = stmt.where(or_(*self._agent_conditions()))
        if self.actions:
            stmt = stmt.where(AuditEntry.action.in_(self.actions))
        if self.outcomes:
            stmt = stmt.where(AuditEntry.outcome.in_(self.outcomes))
        if self.event_types:
            stmt = stmt.where(AuditEntry.event_type.in_(self.event_types))
        for kind, value in ((REF_ENTITY, self.entity), (REF_PATIENT, self.patient)):
            if value is not None:
                stmt = stmt.where(
                    AuditEntry.id.in_(
                        select(AuditRef.entry_id).where(AuditRef.kind == kind, AuditRef.value == value)
                    )
                )
        return stmt

    def _agent_conditions(self) -> list[ColumnElement[bool]]:
        """Any of the agents named: a client by id, or an organization acting or receiving."""
        conditions: list[ColumnElement[bool]] = []
        clients = select(Client.id).where(Client.organization_id.in_(self.agent_organizations))
        if self.agents:
            conditions.append(AuditEntry.client_id.in_(self.agents))
        if self.agent_organizations:
            conditions.append(AuditEntry.client_id.in_(clients))
            conditions.append(
                AuditEntry.id.in_(
                    select(AuditRef.entry_id).where(
                        AuditRef.kind == REF_RECIPIENT, AuditRef.value.in_(self.agent_organizations)
                    )
                )
            )
        return conditions


async def search_page(
    session: AsyncSession, query: AuditQuery, *, after: int, limit: int
) -> Sequence[tuple[int, bytes, int | None]]:
    """Entries with id > ``after`` in id order (keyset paging: stable while the log grows)."""
    rows = await session.execute(
        query.statement().where(AuditEntry.id > after).order_by(AuditEntry.id).limit(limit)
    )
    return [(int(i), bytes(c), li) for i, c, li in rows]


# Date order pages by (recorded, id): the position is both, as microseconds since the epoch and id.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DatePosition = tuple[datetime, int]


def encode_date_position(position: DatePosition) -> str:
    recorded, entry_id = position
    return f"{(recorded - _EPOCH) // timedelta(microseconds=1)}.{entry_id}"


def decode_date_position(text: str) -> DatePosition:
    micros, dot, entry_id = text.partition(".")
    if not (dot and micros.isascii() and micros.isdigit() and entry_id.isascii() and entry_id.isdigit()):
        raise QueryError("_cursor", "_cursor is not a position this search wrote")
    if len(micros) > 17 or len(entry_id) > 18:
        raise QueryError("_cursor", "_cursor is not a position this search wrote")
    return _EPOCH + timedelta(microseconds=int(micros)), int(entry_id)


async def search_page_by_date(
    session: AsyncSession,
    query: AuditQuery,
    *,
    newest_first: bool,
    after: DatePosition | None,
    limit: int,
) -> Sequence[tuple[int, bytes, int | None, datetime]]:
    """Entries in ``recorded`` order (``_sort=date`` / ``-date``), ties by id, after ``after``."""
    recorded, entry = AuditEntry.recorded_at, AuditEntry.id
    stmt = query.statement().add_columns(recorded)
    if after is not None:
        at, after_id = after
        if newest_first:
            stmt = stmt.where(or_(recorded < at, and_(recorded == at, entry < after_id)))
        else:
            stmt = stmt.where(or_(recorded > at, and_(recorded == at, entry > after_id)))
    order = (recorded.desc(), entry.desc()) if newest_first else (recorded.asc(), entry.asc())
    rows = await session.execute(stmt.order_by(*order).limit(limit))
    return [(int(i), bytes(c), li, r) for i, c, li, r in rows]


async def read_entry(session: AsyncSession, entry_id: int) -> tuple[int, bytes, int | None] | None:
    row = (
        await session.execute(
            select(AuditEntry.id, AuditEntry.content, AuditEntry.leaf_index).where(AuditEntry.id == entry_id)
        )
    ).first()
    return None if row is None else (int(row[0]), bytes(row[1]), row[2])


async def stream_entries(
    sessions: async_sessionmaker[AsyncSession],
    query: AuditQuery,
    *,
    batch: int = 500,
    newest_first: bool | None = None,
) -> AsyncIterator[tuple[int, bytes, int | None]]:
    """Every matching entry, one short read transaction per batch (an export can be long):
    in id order, or by date when ``newest_first`` is given."""
    if newest_first is not None:
        position: DatePosition | None = None
        while True:
            async with sessions() as session:
                dated = await search_page_by_date(
                    session, query, newest_first=newest_first, after=position, limit=batch
                )
            for entry_id, content, leaf_index, _ in dated:
                yield entry_id, content, leaf_index
            if len(dated) < batch:
                return
            position = (dated[-1][3], dated[-1][0])
    after = 0
    while True:
        async with sessions() as session:
            rows = await search_page(session, query, after=after, limit=batch)
        for row in rows:
            yield row
        if len(rows) < batch:
            return
        after = rows[-1][0]


async def leaves(session: AsyncSession, *, start: int, end: int) -> Sequence[tuple[int, int, bytes]]:
    """Sealed entries with ``start <= leaf_index < end``: (leaf index, entry id, content)."""
    rows = await session.execute(
        select(AuditEntry.leaf_index, AuditEntry.id, AuditEntry.content)
        .where(AuditEntry.leaf_index >= start, AuditEntry.leaf_index < end)
        .order_by(AuditEntry.leaf_index)
    )
    return [(int(li or 0), int(i), bytes(c)) for li, i, c in rows]


async def entry_leaf(session: AsyncSession, entry_id: int) -> tuple[int | None, bytes] | None:
    row = (
        await session.execute(
            select(AuditEntry.leaf_index, AuditEntry.content).where(AuditEntry.id == entry_id)
        )
    ).first()
    return None if row is None else (row[0], bytes(row[1]))

"""The audit writer: reads' entries are group-committed, and nobody returns before theirs is."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy import event

from service.audit.events import Action, AuditAgent, AuditEntity, AuditRecord, EventType, Outcome
from service.audit.writer import AuditWriter
from service.store.database import Database


def _record(i: int) -> AuditRecord:
    return AuditRecord(
        event_type=EventType.disclosure,
        subtype="read",
        action=Action.read,
        outcome=Outcome.success,
        agent=AuditAgent("client-a", "org-a", "authority", None),
        purpose="PUBHLTH",
        entities=(AuditEntity("Observation", f"obs-{i}", 1, f"{i:064x}"),),
        patient_ids=(f"pat-{i}",),
    )


async def _stored(database: Database) -> dict[str, dict[str, Any]]:
    async with database.engine.connect() as conn:
        rows = (await conn.execute(sa.text("SELECT content FROM audit_entries"))).scalars().all()
    return {c["request"]: c for c in (orjson.loads(bytes(r)) for r in rows)}


def _run(database_url: str, work: Any) -> Any:
    async def go() -> Any:
        database = Database(database_url)
        try:
            return await work(database)
        finally:
            await database.dispose()

    return asyncio.run(go())


def test_concurrent_requests_share_a_few_transactions_and_every_entry_is_committed(
    database_url: str,
) -> None:
    async def work(database: Database) -> tuple[int, dict[str, dict[str, Any]]]:
        commits = 0

        def count(_conn: Any) -> None:
            nonlocal commits
            commits += 1

        event.listen(database.engine.sync_engine, "commit", count)
        writer = AuditWriter(database)
        await asyncio.gather(
            *(writer.write([_record(i)], request_id=f"req-{i}", source="test") for i in range(40))
        )
        return commits, await _stored(database)

    commits, stored = _run(database_url, work)
    assert set(stored) == {f"req-{i}" for i in range(40)}
    assert stored["req-7"]["entities"][0]["id"] == "obs-7"
    assert commits <= 3, f"{commits} transactions for 40 entries: not batched"


def test_an_entry_that_cannot_be_written_fails_only_its_own_request(database_url: str) -> None:
    broken = replace(_record(99), purpose={"not", "json"})  # type: ignore[arg-type]

    async def work(database: Database) -> tuple[list[BaseException | None], dict[str, dict[str, Any]]]:
        writer = AuditWriter(database)
        writes = [writer.write([_record(i)], request_id=f"req-{i}", source="test") for i in range(5)]
        writes.insert(2, writer.write([broken], request_id="req-broken", source="test"))
        results = await asyncio.gather(*writes, return_exceptions=True)
        return list(results), await _stored(database)

    results, stored = _run(database_url, work)
    assert [r is None for r in results] == [True, True, False, True, True, True]
    assert isinstance(results[2], TypeError)
    assert set(stored) == {f"req-{i}" for i in range(5)}


def test_entries_of_a_cancelled_request_are_still_written(database_url: str) -> None:
    async def work(database: Database) -> dict[str, dict[str, Any]]:
        writer = AuditWriter(database)
        task = asyncio.create_task(writer.write([_record(1)], request_id="req-gone", source="test"))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await writer.drain()
        return await _stored(database)

    assert "req-gone" in _run(database_url, work)


def test_an_unreachable_database_raises_instead_of_returning() -> None:
    async def work() -> None:
        database = Database("postgresql+asyncpg://postgres@127.0.0.1:9/nowhere")
        try:
            await AuditWriter(database).write([_record(1)], request_id="req", source="test")
        finally:
            await database.dispose()

    with pytest.raises(OSError):
        asyncio.run(work())

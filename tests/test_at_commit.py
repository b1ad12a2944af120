"""Work a transaction runs as its last statements (service.store.database.at_commit).

Subscription events are numbered this way, so that the lock on a subscription's counter is held
for the COMMIT only: every path that commits must run the work, a rollback must drop it, and a
commit that would skip it must fail rather than lose it.
"""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from service.store.database import Database, at_commit, run_at_commit

_DDL = "CREATE TABLE IF NOT EXISTS at_commit_probe (note VARCHAR(32) NOT NULL)"


async def _notes(database: Database) -> list[str]:
    async with database.reading() as session:
        return list(
            (await session.execute(sa.text("SELECT note FROM at_commit_probe ORDER BY note"))).scalars()
        )


def _scenario(database_url: str) -> list[str]:
    async def run() -> list[str]:
        database = Database(database_url)
        try:
            async with database.transaction() as session:
                await session.execute(sa.text(_DDL))
                await session.execute(sa.text("DELETE FROM at_commit_probe"))
            order: list[str] = []

            async with database.transaction() as session:

                async def last() -> None:
                    order.append("last")
                    await session.execute(sa.text("INSERT INTO at_commit_probe VALUES ('at-commit')"))

                    async def later() -> None:  # registered by the work itself: runs too
                        order.append("later")

                    at_commit(session, later)

                at_commit(session, last)
                await session.execute(sa.text("INSERT INTO at_commit_probe VALUES ('body')"))
                order.append("body")
            assert order == ["body", "last", "later"]

            with pytest.raises(RuntimeError, match="rolled back"):
                async with database.transaction() as session:
                    at_commit(session, last)
                    raise RuntimeError("rolled back")

            # A commit that would skip the work fails, and nothing of the transaction stays.
            with pytest.raises(RuntimeError, match="without the work registered"):
                async with database.sessions() as session, session.begin():
                    await session.execute(sa.text("INSERT INTO at_commit_probe VALUES ('skipped')"))
                    at_commit(session, last)

            # The same session, its work run by hand before committing, is fine.
            async with database.sessions() as session, session.begin():
                at_commit(session, last)
                await run_at_commit(session)
            return await _notes(database)
        finally:
            await database.dispose()

    return asyncio.run(run())


def test_work_at_commit_runs_last_is_dropped_on_rollback_and_cannot_be_skipped(database_url: str) -> None:
    assert _scenario(database_url) == ["at-commit", "at-commit", "body"]

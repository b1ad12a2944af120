"""Async engine and session factory for PostgreSQL (asyncpg) and SQLite (aiosqlite)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL: ~4x the durable commit rate of the default journal, and readers do
    # not block the writer. foreign_keys is off by default in SQLite.
    # Take transaction control from the driver (its implicit BEGIN breaks SAVEPOINTs);
    # _sqlite_begin below issues the BEGIN.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    # IMMEDIATE takes the write lock up front. A deferred transaction that reads
    # and then writes fails with SQLITE_BUSY when another writer committed in
    # between; SQLite has one writer at a time anyway. Reads (autocommit) take no lock.
    if conn.get_execution_options().get("isolation_level") == READ_ONLY_ISOLATION:
        return
    conn.exec_driver_sql("BEGIN IMMEDIATE")


# Reads run in autocommit: no BEGIN and COMMIT round trips. Under PostgreSQL's READ
# COMMITTED every statement takes its own snapshot inside a transaction too, so a
# read loses no consistency by it; a request that writes always gets a transaction.
READ_ONLY_ISOLATION = "AUTOCOMMIT"


def create_engine(database_url: str, *, pool_size: int = 10) -> AsyncEngine:
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 10})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
        return engine
    engine = create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=5,
        # A statement that waits longer than this is a stuck request, not a slow one.
        connect_args={"server_settings": {"statement_timeout": "30000"}, "timeout": 5},
    )
    event.listen(engine.sync_engine, "checkout", _discard_closed)
    return engine


def _discard_closed(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """Hand out no connection the server has closed (a restart, an idle timeout).

    Instead of pool_pre_ping, which costs three round trips per checkout with
    asyncpg (BEGIN, a ping, ROLLBACK): asyncpg marks a connection closed as soon
    as the server ends it, so the check is free; the pool replaces the connection.
    A connection that dies silently fails its next statement, which answers 503
    and invalidates the pool.
    """
    if dbapi_connection._connection.is_closed():
        raise DisconnectionError


# Work a transaction runs as its last statements, just before it commits (see at_commit).
_AT_COMMIT = "mhr.at_commit"


def at_commit(session: AsyncSession, work: Callable[[], Awaitable[None]]) -> None:
    """Run ``work`` in this session's transaction as its last statements, just before COMMIT.

    For a statement that takes a lock many transactions want (a subscription's event counter):
    taken last, it is held for the COMMIT only, not for everything the request writes after it.
    Every way this service commits runs it (:meth:`Database.transaction`, the request
    transaction of service.api.deps, both through :func:`run_at_commit`); a commit that would
    skip it fails instead (nothing is half-written), and a rollback drops it.
    """
    session.sync_session.info.setdefault(_AT_COMMIT, []).append(work)


async def run_at_commit(session: AsyncSession) -> None:
    """Run the work registered with :func:`at_commit`, in order (work may register more)."""
    while pending := session.sync_session.info.pop(_AT_COMMIT, None):
        for work in pending:
            await work()


@event.listens_for(Session, "before_commit")
def _refuse_skipped_work(session: Session) -> None:
    if session.info.get(_AT_COMMIT):
        raise RuntimeError("a transaction committed without the work registered to run at its commit")


@event.listens_for(Session, "after_rollback")
def _drop_work(session: Session) -> None:
    session.info.pop(_AT_COMMIT, None)


class Database:
    """Owns the engine; hands out sessions whose transaction the caller ends."""

    def __init__(self, database_url: str, *, pool_size: int = 10) -> None:
        self.url = database_url
        self.engine = create_engine(database_url, pool_size=pool_size)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session in one transaction: committed on success, rolled back on error."""
        async with self.sessions() as session, session.begin():
            yield session
            await run_at_commit(session)

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncSession]:
        """A session for reads only, outside any transaction (see READ_ONLY_ISOLATION)."""
        async with self.engine.connect() as connection:
            await connection.execution_options(isolation_level=READ_ONLY_ISOLATION)
            async with AsyncSession(bind=connection, expire_on_commit=False) as session:
                yield session

    async def ping(self) -> bool:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception:
            return False
        return True

    async def dispose(self) -> None:
        await self.engine.dispose()

"""Alembic environment: runs migrations over the service's async engine.

The URL comes from the Alembic config (set by ``service.store.migrate``) or,
when the ``alembic`` CLI is used directly, from ``MHR_DATABASE_URL``.
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from service.store.database import create_engine
from service.store.tables import Base

config = context.config
if config.config_file_name is not None:  # no alembic.ini: logging is the service's
    fileConfig(config.config_file_name)

target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("MHR_DATABASE_URL")
    if not url:
        raise RuntimeError("set MHR_DATABASE_URL to the database to migrate")
    return url


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Fail fast instead of queueing behind live traffic for a lock.
            context.execute("SET LOCAL lock_timeout = '10s'")
            context.execute("SET LOCAL statement_timeout = '300s'")
        context.run_migrations()


async def _run_async() -> None:
    engine = create_engine(_url(), pool_size=1)
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
    else:
        asyncio.run(_run_async())


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()

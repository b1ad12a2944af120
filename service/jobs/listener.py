"""Wake this process's idle workers when another process enqueues a due job (PostgreSQL).

A transaction that enqueues a job due now sends ``NOTIFY mhr_jobs`` (service.jobs.wakeup); the
server delivers it when that transaction commits, to every session that listens. Each process
that runs job workers keeps one connection of its own listening (outside the pool: a listening
connection must stay open and never be handed to a request) and wakes its workers on each
notification. A connection that is lost is replaced after a pause; meanwhile the workers poll
as they always do, so a lost notification delays a job by at most the poll interval.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.engine import make_url

from service.jobs import wakeup

log = logging.getLogger("mhr.jobs")

# How the listening connection names itself to the server (pg_stat_activity.application_name).
APPLICATION_NAME = "mhr-job-listener"
RECONNECT_SECONDS = 5.0
# How often the listening connection is checked (a server restart ends it without a word).
CHECK_SECONDS = 5.0


def asyncpg_dsn(database_url: str) -> str:
    """The libpq-style address of a SQLAlchemy ``postgresql+asyncpg://`` URL."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


def _notified(*_args: Any) -> None:
    wakeup.wake()


async def listen_forever(database_url: str) -> None:
    """Listen on the jobs channel until cancelled, reconnecting when the connection is lost."""
    dsn = asyncpg_dsn(database_url)
    while True:
        connection = None
        try:
            connection = await asyncpg.connect(
                dsn, timeout=5, server_settings={"application_name": APPLICATION_NAME}
            )
            await connection.add_listener(wakeup.CHANNEL, _notified)
            # A job enqueued while nobody listened is found by the next look for due jobs.
            wakeup.wake()
            while not connection.is_closed():
                await asyncio.sleep(CHECK_SECONDS)
                await connection.execute("SELECT 1")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "job notifications: connection lost; workers poll until it is back",
                extra={"error_type": type(exc).__name__},
            )
        finally:
            if connection is not None and not connection.is_closed():
                await connection.close(timeout=2)
        await asyncio.sleep(RECONNECT_SECONDS)

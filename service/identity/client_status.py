"""Whether a client is still enabled, cached briefly so that every request need not ask the database.

A disabled client's tokens stop working within ``ttl_seconds`` (default 10 s),
well inside the token lifetime the issue allows.
"""

from __future__ import annotations

import time

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.identity.repository import IdentityRepository


class ClientStatusCache:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], *, ttl_seconds: float) -> None:
        self._sessions = sessions
        self._ttl = ttl_seconds
        self._entries: dict[str, tuple[float, bool]] = {}

    async def is_active(self, client_id: str) -> bool:
        entry = self._entries.get(client_id)
        now = time.monotonic()
        if entry is not None and now - entry[0] < self._ttl:
            return entry[1]
        async with self._sessions() as session:
            active = await IdentityRepository(session).client_active(client_id)
        self._entries[client_id] = (now, active)
        return active

    def forget(self, client_id: str) -> None:
        self._entries.pop(client_id, None)

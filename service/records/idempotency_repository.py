"""SQL for remembered requests (``idempotent_requests``): claim a key, read it, settle it."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from service.store.tables import IdempotentRequest

_TABLE = cast(Table, IdempotentRequest.__table__)


class IdempotencyRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def forget_expired(self, scope: str, now: datetime) -> None:
        """Drop this scope's remembered requests past their time (bounded by the scope's own traffic)."""
        await self.session.execute(
            delete(IdempotentRequest).where(
                IdempotentRequest.scope == scope,
                IdempotentRequest.expires_at.is_not(None),
                IdempotentRequest.expires_at < now,
            )
        )

    async def claim(
        self,
        scope: str,
        key_hash: bytes,
        request_hash: bytes,
        now: datetime,
        expires_at: datetime | None,
        index_key_id: str | None = None,
    ) -> bool:
        """Insert a pending row; False when the key is already held.

        Like a plain INSERT, this waits for a concurrent uncommitted claim of the same key, so
        a False is followed by a read that sees the other transaction's committed row.
        """
        sqlite_bind = self.session.get_bind().dialect.name == "sqlite"
        flavour: Any = sqlite.insert if sqlite_bind else postgresql.insert
        statement = (
            flavour(_TABLE)
            .values(
                scope=scope,
                key_hash=key_hash,
                request_hash=request_hash,
                outcome=None,
                created_at=now,
                expires_at=expires_at,
                index_key_id=index_key_id,
            )
            .on_conflict_do_nothing()
            .returning(_TABLE.c.key_hash)
        )
        return (await self.session.execute(statement)).scalar_one_or_none() is not None

    async def get(self, scope: str, key_hash: bytes) -> IdempotentRequest | None:
        result = await self.session.execute(
            select(IdempotentRequest)
            .where(IdempotentRequest.scope == scope, IdempotentRequest.key_hash == key_hash)
            .execution_options(populate_existing=True)
        )
        return result.scalar_one_or_none()

    async def settle(self, scope: str, key_hash: bytes, outcome: dict[str, Any]) -> None:
        await self.session.execute(
            update(IdempotentRequest)
            .where(IdempotentRequest.scope == scope, IdempotentRequest.key_hash == key_hash)
            .values(outcome=outcome)
        )

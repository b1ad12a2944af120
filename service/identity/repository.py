"""SQL for organizations, clients and the assertion replay store. No rules here."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from service.store.tables import AssertionJti, Client, Organization


def name_key(text: str) -> str:
    """A name folded for matching: case-folded, accents (combining marks) removed, spaces collapsed."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return " ".join("".join(c for c in decomposed if not unicodedata.combining(c)).split())


class IdentityRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def organization(self, org_id: str) -> Organization | None:
        return await self.session.get(Organization, org_id)

    async def organization_by_id_or_name(self, key: str) -> Organization | None:
        found = await self.session.get(Organization, key)
        if found is not None:
            return found
        result = await self.session.execute(select(Organization).where(Organization.name == key))
        return result.scalar_one_or_none()

    async def organizations(
        self, *, name: str | None = None, kind: str | None = None, limit: int = 100, offset: int = 0
    ) -> Sequence[Organization]:
        """Organizations by name, optionally of one kind. ``name`` matches as a FHIR string
        parameter: a prefix, ignoring case and accents ("sante" finds "Santé Publique").

        The name test runs here rather than in SQL: SQLite folds ASCII case only and neither
        database ignores accents, and registered organizations are few (an admin adds each)."""
        query = select(Organization).order_by(Organization.name, Organization.id)
        if kind is not None:
            query = query.where(Organization.kind == kind)
        if name is None:
            result = await self.session.execute(query.limit(limit).offset(offset))
            return result.scalars().all()
        prefix = name_key(name)
        matching = [
            o for o in (await self.session.execute(query)).scalars() if name_key(o.name).startswith(prefix)
        ]
        return matching[offset : offset + limit]

    async def add_organization(self, org: Organization) -> None:
        self.session.add(org)
        await self.session.flush()

    async def client(self, client_id: str) -> Client | None:
        return await self.session.get(Client, client_id)

    async def clients(self) -> Sequence[Client]:
        result = await self.session.execute(select(Client).order_by(Client.created_at))
        return result.scalars().all()

    async def add_client(self, client: Client) -> None:
        self.session.add(client)
        await self.session.flush()

    async def disable_client(self, client_id: str, at: datetime) -> bool:
        result = await self.session.execute(
            update(Client)
            .where(Client.id == client_id, Client.active.is_(True))
            .values(active=False, disabled_at=at)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def client_active(self, client_id: str) -> bool:
        result = await self.session.execute(select(Client.active).where(Client.id == client_id))
        return bool(result.scalar_one_or_none())

    async def remember_jti(self, client_id: str, jti: str, expires_at: datetime) -> bool:
        """Record an assertion id; False when it was already used (a replay)."""
        try:
            async with self.session.begin_nested():
                self.session.add(AssertionJti(client_id=client_id, jti=jti, expires_at=expires_at))
        except IntegrityError:
            return False
        return True

    async def purge_expired_jtis(self, now: datetime) -> None:
        await self.session.execute(delete(AssertionJti).where(AssertionJti.expires_at < now))

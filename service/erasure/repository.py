"""SQL for erasure: what links or decrypts one migrant, requests, holds. No HTTP, no rules."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, and_, delete, exists, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from security.consent import PERMIT_STATUTORY
from service.records import kept_totals
from service.records.idempotency import Remembered
from service.store.tables import (
    Client,
    DisclosureGrant,
    ErasureRequest,
    IdempotentRequest,
    MatchKey,
    ResourceVersion,
    RetentionHold,
    SearchToken,
    StoredResource,
    Subject,
)


def _count(result: Any) -> int:
    return int(cast(CursorResult[Any], result).rowcount or 0)


class ErasureRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # --- the migrant ---------------------------------------------------------------
    async def subject_for_update(self, subject_id: str) -> Subject | None:
        """The migrant's row, locked (PostgreSQL) so that two approvals cannot both erase."""
        result = await self.session.execute(select(Subject).where(Subject.id == subject_id).with_for_update())
        return result.scalar_one_or_none()

    async def submitting_organization(self, subject_id: str) -> str | None:
        """The clinic that submitted the migrant's Patient resource."""
        result = await self.session.execute(
            select(StoredResource.organization_id).where(
                StoredResource.resource_type == "Patient", StoredResource.id == subject_id
            )
        )
        return result.scalar_one_or_none()

    async def delete_search_tokens(self, subject_id: str) -> int:
        mine = exists().where(
            StoredResource.resource_type == SearchToken.resource_type,
            StoredResource.id == SearchToken.id,
            StoredResource.subject_id == subject_id,
        )
        return _count(await self.session.execute(delete(SearchToken).where(mine)))

    async def delete_match_keys(self, subject_id: str) -> int:
        """The identifier hashes (``ifNoneExist``) held by any of the migrant's resources."""
        mine = exists().where(
            StoredResource.resource_type == MatchKey.resource_type,
            StoredResource.id == MatchKey.resource_id,
            StoredResource.subject_id == subject_id,
        )
        return _count(await self.session.execute(delete(MatchKey).where(mine)))

    async def delete_remembered_writes(self, subject_id: str, organization_id: str) -> int:
        """Remembered answers of writes (Idempotency-Key, Bundle.identifier) naming the migrant.

        Their keys are HMACs of the clinic's exam identifiers and its clients' keys: kept, they
        would link those to the migrant. Only the submitting clinic and its clients write for a
        migrant, so only their scopes are read; the outcome names each entry's subject."""
        clients = await self.session.execute(
            select(Client.id).where(Client.organization_id == organization_id)
        )
        scopes = [f"organization:{organization_id}", *(f"client:{c}" for c in clients.scalars())]
        rows = await self.session.execute(
            select(IdempotentRequest.scope, IdempotentRequest.key_hash, IdempotentRequest.outcome).where(
                IdempotentRequest.scope.in_(scopes), IdempotentRequest.outcome.is_not(None)
            )
        )
        doomed = [
            (row.scope, row.key_hash)
            for row in rows
            if any(e.subject_id == subject_id for e in Remembered.from_json(row.outcome).entries)
        ]
        for scope, key_hash in doomed:
            await self.session.execute(
                delete(IdempotentRequest).where(
                    IdempotentRequest.scope == scope, IdempotentRequest.key_hash == key_hash
                )
            )
        return len(doomed)

    async def delete_grants(self, subject_id: str) -> int:
        """Delete the migrant's grants, and their counts from the kept totals."""
        deleted, removed = await kept_totals.delete_grants(self.session, subject_id)
        await kept_totals.record(self.session, Counter({key: -count for key, count in removed.items()}))
        return deleted

    async def clear_label_tokens(self, subject_id: str) -> tuple[int, int]:
        """(label tokens cleared, versions kept): the ciphertexts stay, unreadable."""
        versions = await self.session.execute(
            select(ResourceVersion.resource_type).where(ResourceVersion.subject_id == subject_id)
        )
        kept = len(versions.all())
        cleared = await self.session.execute(
            update(ResourceVersion)
            .where(ResourceVersion.subject_id == subject_id, ResourceVersion.labels_token.is_not(None))
            .values(labels_token=None)
        )
        return _count(cleared), kept

    async def clear_clinical_dates(self, subject_id: str) -> int:
        statement = (
            update(StoredResource)
            .where(StoredResource.subject_id == subject_id, StoredResource.clinical_date.is_not(None))
            .values(clinical_date=None)
        )
        return _count(await self.session.execute(statement))

    async def destroy_key(self, subject_id: str, at: datetime) -> int:
        statement = (
            update(Subject)
            .where(Subject.id == subject_id, Subject.erased_at.is_(None))
            .values(wrapped_key=None, erased_at=at)
        )
        return _count(await self.session.execute(statement))

    # --- holds -----------------------------------------------------------------------
    async def active_holds(self, subject_id: str) -> list[RetentionHold]:
        result = await self.session.execute(
            select(RetentionHold)
            .where(RetentionHold.subject_id == subject_id, RetentionHold.released_at.is_(None))
            .order_by(RetentionHold.id)
        )
        return list(result.scalars())

    async def statutory_consents(self, subject_id: str, at: datetime) -> list[tuple[str, int]]:
        """The Consents on a statutory legal basis in force for this migrant (id, version)."""
        g = DisclosureGrant
        result = await self.session.execute(
            select(g.consent_id, g.consent_version)
            .where(
                g.subject_id == subject_id,
                g.rule == PERMIT_STATUTORY,
                or_(g.valid_to.is_(None), g.valid_to > at),
            )
            .distinct()
            .order_by(g.consent_id)
        )
        return [(row.consent_id, row.consent_version) for row in result]

    async def hold(self, hold_id: int) -> RetentionHold | None:
        return await self.session.get(RetentionHold, hold_id)

    def add(self, row: ErasureRequest | RetentionHold) -> None:
        self.session.add(row)

    async def flush(self) -> None:
        await self.session.flush()

    # --- requests --------------------------------------------------------------------
    async def request(self, request_id: str, *, for_update: bool = False) -> ErasureRequest | None:
        statement = select(ErasureRequest).where(ErasureRequest.id == request_id)
        if for_update:
            statement = statement.with_for_update()
        return (await self.session.execute(statement)).scalar_one_or_none()

    async def open_request(self, subject_id: str) -> ErasureRequest | None:
        result = await self.session.execute(
            select(ErasureRequest).where(
                and_(ErasureRequest.subject_id == subject_id, ErasureRequest.state == "requested")
            )
        )
        return result.scalars().first()

    async def completed_request(self, subject_id: str) -> ErasureRequest | None:
        result = await self.session.execute(
            select(ErasureRequest).where(
                ErasureRequest.subject_id == subject_id, ErasureRequest.state == "erased"
            )
        )
        return result.scalars().first()

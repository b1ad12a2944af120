"""SQL for exports: the kick-off rows, their checkpoints and files, and the next migrants to write.

No HTTP, no rules: which versions an authority may see is the one predicate of
``service.records.grant_predicate``, applied here and in ``RecordRepository.search``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import cast

from sqlalchemy import Table, and_, delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from service.records.grant_predicate import Audience, visible
from service.store.tables import BulkExport, BulkExportFile, ResourceVersion, StoredResource

_RESOURCES = cast(Table, StoredResource.__table__)
_VERSIONS = cast(Table, ResourceVersion.__table__)


class ExportRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def add(self, export: BulkExport) -> None:
        self.session.add(export)

    async def get(self, export_id: str) -> BulkExport | None:
        return await self.session.get(BulkExport, export_id)

    async def locked(self, export_id: str) -> BulkExport | None:
        """The export, row-locked (PostgreSQL) so that a cancel waits for a running step."""
        found = await self.session.execute(
            select(BulkExport).where(BulkExport.id == export_id).with_for_update()
        )
        return found.scalar_one_or_none()

    async def files(self, export_id: str) -> list[BulkExportFile]:
        found = await self.session.execute(
            select(BulkExportFile)
            .where(BulkExportFile.export_id == export_id)
            .order_by(BulkExportFile.resource_type)
        )
        return list(found.scalars())

    async def file(self, export_id: str, resource_type: str) -> BulkExportFile | None:
        return await self.session.get(BulkExportFile, (export_id, resource_type))

    async def drop_files(self, export_id: str) -> None:
        await self.session.execute(delete(BulkExportFile).where(BulkExportFile.export_id == export_id))

    async def next_subjects(
        self,
        audience: Audience,
        types: Sequence[str],
        *,
        since: datetime | None,
        until: datetime,
        after: str | None,
        limit: int,
    ) -> list[str]:
        """The next ``limit`` migrants (in pseudonym order, after ``after``) with at least one
        current resource of these types, written in ``(since, until]``, that ``audience`` may see."""
        r, v = _RESOURCES, _VERSIONS
        conditions = [
            r.c.resource_type.in_(list(types)),
            r.c.last_updated <= until,
            visible(v, audience),
        ]
        if since is not None:
            conditions.append(r.c.last_updated > since)
        if after is not None:
            conditions.append(v.c.subject_id > after)
        statement = (
            select(v.c.subject_id)
            .select_from(
                r.join(
                    v,
                    and_(
                        v.c.resource_type == r.c.resource_type,
                        v.c.id == r.c.id,
                        v.c.version_id == r.c.version_id,
                    ),
                )
            )
            .where(*conditions)
            .group_by(v.c.subject_id)
            .order_by(v.c.subject_id)
            .limit(limit)
        )
        connection = await self.session.connection()
        result = await connection.execute(statement, audience.params())
        return [str(subject_id) for subject_id in result.scalars()]

    async def expired(self, now: datetime, limit: int = 100) -> list[BulkExport]:
        found = await self.session.execute(
            select(BulkExport)
            .where(BulkExport.expires_at.is_not(None), BulkExport.expires_at <= now)
            .where(BulkExport.state.in_(["complete", "failed", "cancelled"]))
            .limit(limit)
        )
        return list(found.scalars())

"""SQL for exports: the kick-off rows, their checkpoints and files, and the next migrants to write.

No HTTP, no rules: which versions an authority may see is the one predicate of
``service.records.grant_predicate``, applied by ``RecordRepository.search``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, exists, select
from sqlalchemy.ext.asyncio import AsyncSession

from service.records.grant_predicate import GRANTS, SUBJECTS, GrantFilter
from service.store.tables import BulkExport, BulkExportFile


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
        self, grant: GrantFilter, types: Sequence[str], *, after: str | None, limit: int
    ) -> list[str]:
        """The next ``limit`` candidate migrants (in pseudonym order, after ``after``): those with a
        disclosure grant for this organization and purpose on one of these types.

        Candidates only, cheap to page through (an index on the grants): whether any of their
        versions may be seen, now, is decided by the visibility predicate when their resources
        are fetched (``RecordRepository.search``); a candidate with nothing visible is skipped."""
        # The migrants in pseudonym order (the primary key), each probed for a grant: a step reads
        # about as many rows as it returns, wherever the checkpoint is (a DISTINCT over the
        # authority's grants of several types sorts all those after the checkpoint, every step).
        g, s = GRANTS, SUBJECTS
        granted = exists().where(
            g.c.subject_id == s.c.id,
            g.c.organization_id == grant.organization_id,
            g.c.purpose == grant.purpose,
            g.c.resource_type.in_(list(types)),
        )
        statement = select(s.c.id).where(granted).order_by(s.c.id).limit(limit)
        if after is not None:
            statement = statement.where(s.c.id > after)
        result = await self.session.execute(statement)
        return [str(subject_id) for subject_id in result.scalars()]

    async def expired(self, now: datetime, limit: int = 100) -> list[BulkExport]:
        found = await self.session.execute(
            select(BulkExport)
            .where(BulkExport.expires_at.is_not(None), BulkExport.expires_at <= now)
            .where(BulkExport.state.in_(["complete", "failed", "cancelled"]))
            .limit(limit)
        )
        return list(found.scalars())

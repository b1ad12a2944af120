"""Bring stored label tokens and disclosure grants in line with the current labelling rules.

A resource's label token is computed when it is written, and a migrant's grants when one of
their Consents changes. Rows written under older rules (fewer ValueSets, labels the labeller used
to ignore, fewer grantable labels) keep what was computed then: a resource may carry the token of
an unlabelled one, and grants may lack the label sets a consent now grants. ``relabel`` recomputes
both from the decrypted current versions. The stored bodies are not rewritten (that would be a
new version); the token follows the labels the rules give the body now.

Each migrant is one transaction, with the current rows locked as a write locks them. Erased
migrants are skipped: their data cannot be read and is never disclosed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import select, update

from service.records.codec import open_version
from service.records.consents import refresh_grants
from service.records.context import RecordServices
from service.records.indexing import labels_token
from service.records.repository import RecordRepository
from service.store.database import Database
from service.store.tables import StoredResource, Subject


@dataclass(frozen=True)
class RelabelCounts:
    migrants: int
    resources: int
    changed: int  # resources whose label token changed
    grants: int  # grants stored afterwards, over all migrants


async def relabel(database: Database, services: RecordServices) -> RelabelCounts:
    async with database.reading() as session:
        subject_ids = list(
            (
                await session.execute(
                    select(Subject.id).where(Subject.wrapped_key.is_not(None)).order_by(Subject.id)
                )
            ).scalars()
        )
    resources = changed = grants = 0
    for subject_id in subject_ids:
        async with database.transaction() as session:
            n, c, g = await _relabel_subject(RecordRepository(session), services, subject_id)
        resources, changed, grants = resources + n, changed + c, grants + g
    return RelabelCounts(len(subject_ids), resources, changed, grants)


async def _relabel_subject(
    repo: RecordRepository, services: RecordServices, subject_id: str
) -> tuple[int, int, int]:
    subject = await repo.subject(subject_id)
    if subject is None or subject.wrapped_key is None:
        return 0, 0, 0
    session = repo.session
    rows = (
        await session.execute(
            select(StoredResource)
            .where(StoredResource.subject_id == subject_id)
            .order_by(StoredResource.resource_type, StoredResource.id)
            .with_for_update()
        )
    ).scalars()
    seen = changed = 0
    for row in list(rows):
        version = await repo.version(row.resource_type, row.id, row.version_id)
        if version is None:
            continue
        resource: Any = orjson.loads(open_version(services.keys, subject, version))
        token = labels_token(services.indexer, services.labeler.apply(resource))
        seen += 1
        if token != row.labels_token:
            changed += 1
            await session.execute(
                update(StoredResource)
                .where(StoredResource.resource_type == row.resource_type, StoredResource.id == row.id)
                .values(labels_token=token)
            )
    grants = await refresh_grants(services, repo, subject_id, {})
    return seen, changed, grants

"""Bring stored label tokens and disclosure grants in line with the current labelling rules.

A resource's label token is computed when it is written, and a migrant's grants when one of
their Consents changes. Rows written under older rules (fewer ValueSets, labels the labeller used
to ignore, fewer grantable labels) keep what was computed then: a resource may carry the token of
an unlabelled one, and grants may lack the label sets a consent now grants. ``relabel`` recomputes
both from the decrypted versions, every version (consent decides on the version served), so it
also labels versions written before labels were kept per version. The stored bodies are not
rewritten (that would be a new version); the token follows the labels the rules give the body now.

Each migrant is one transaction, with the current rows locked as a write locks them. Erased
migrants are skipped: their data cannot be read and is never disclosed.

A relabel changes who may see what as surely as a Consent does, so the write observers
(service.records.write_observers: subscription events, follow-up tasks) see the migrant before
and after, in the same transaction, as they see an intake's: a version a relabel lets an
authority see is a ``record-visible`` event for it, one it hides is none (and an event already
queued for it is withheld at delivery, which decides consent again), and tasks follow.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import select

from security.blind_index import BlindIndexer
from service.audit.events import AuditAgent
from service.records.codec import open_version
from service.records.consents import refresh_grants
from service.records.context import RecordServices
from service.records.indexing import labels_token
from service.records.repository import RecordRepository, version_row
from service.records.subject_keys import OpenedKeys
from service.records.write_observers import CommittedWrite, new_observers
from service.store.database import Database
from service.store.tables import ResourceVersion, StoredResource, Subject

# Who a relabel's withdrawal notices name as having acted: the service, on an operator's command.
RELABEL_AGENT = AuditAgent(client_id=None, organization_id=None, role="system")


@dataclass(frozen=True)
class RelabelCounts:
    migrants: int
    resources: int  # resource versions read
    changed: int  # versions whose label token changed
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
            n, c, g = await relabel_subject(RecordRepository(session), services, subject_id)
        resources, changed, grants = resources + n, changed + c, grants + g
    return RelabelCounts(len(subject_ids), resources, changed, grants)


async def relabel_subject(
    repo: RecordRepository,
    services: RecordServices,
    subject_id: str,
    *,
    indexer: BlindIndexer | None = None,
    keys: OpenedKeys | None = None,
) -> tuple[int, int, int]:
    """``indexer``: the index key to compute the tokens under (by default the migrant's own; a
    re-index passes the key it moves them to). ``keys``: the caller's opened subject keys."""
    subject = await repo.subject(subject_id)
    if subject is None or subject.wrapped_key is None:
        return 0, 0, 0
    if indexer is None:
        indexer = services.index_keys.for_kid(subject.index_key_id)
    if keys is not None:
        return await _relabel_versions(repo, services, subject, keys, indexer)
    # This migrant's key, unwrapped once for all their versions and forgotten before the next one.
    opened = services.keys.opened()
    try:
        return await _relabel_versions(repo, services, subject, opened, indexer)
    finally:
        opened.close()


async def _relabel_versions(
    repo: RecordRepository,
    services: RecordServices,
    subject: Subject,
    keys: OpenedKeys,
    indexer: BlindIndexer,
) -> tuple[int, int, int]:
    subject_id = subject.id
    session = repo.session
    # The current rows are locked as a write locks them, so no new version appears meanwhile;
    # every version is relabelled, since consent decides on the version served (vread, history).
    await session.execute(
        select(StoredResource.id).where(StoredResource.subject_id == subject_id).with_for_update()
    )
    now = datetime.now(UTC)
    observers = new_observers()
    for observer in observers:
        await observer.before_grants(repo, frozenset({subject_id}), now)
    versions = (
        await session.execute(
            select(ResourceVersion)
            .where(ResourceVersion.subject_id == subject_id)
            .order_by(ResourceVersion.resource_type, ResourceVersion.id, ResourceVersion.version_id)
        )
    ).scalars()
    seen = changed = 0
    for stored in list(versions):
        row = version_row(stored)
        resource: Any = orjson.loads(open_version(keys, subject, row))
        token = labels_token(indexer, services.labeler.apply(resource))
        seen += 1
        if token != row.labels_token:
            changed += 1
            await repo.set_labels_token(row, token)
    grants = await refresh_grants(services, repo, subject_id, {}, keys=keys, indexer=indexer)
    write = CommittedWrite(
        services=services, repo=repo, keys=keys, written=[], consent_versions={}, agent=RELABEL_AGENT, at=now
    )
    for observer in observers:
        await observer.after_grants(write)
    return seen, changed, grants

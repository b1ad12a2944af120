"""Turning a migrant's stored Consents into disclosure grants, whenever one of them changes.

The grants are what ``security.consent.decide`` answers for every kind of
resource over time (``security.consent_grants``); this module only loads the
Consents, decrypts and parses them, and stores the result.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from security.blind_index import BlindIndexer
from security.consent import ConsentPolicy
from security.consent_grants import materialise_grants
from service.identity.organizations import ORG_IDENTIFIER_SYSTEM
from service.records.codec import open_version
from service.records.consent_model import consent_policy_from_fhir
from service.records.context import RecordServices
from service.records.indexing import labels_token
from service.records.repository import RecordRepository
from service.records.resource_types import STORED_TYPES
from service.records.subject_keys import OpenedKeys
from service.store.tables import Subject


async def load_policies(
    services: RecordServices,
    repo: RecordRepository,
    subject_id: str,
    fresh: Mapping[str, tuple[int, bytes]] | None = None,
    *,
    keys: OpenedKeys,
    new_subject: bool = False,
) -> list[ConsentPolicy]:
    """The migrant's current Consents as policies.

    ``fresh`` holds the (version, body) of Consents written in this transaction. With
    ``new_subject`` (the migrant was created in this transaction) those are all there
    is, and the store is not asked. ``keys``: the request's (or job's) opened keys.
    """
    fresh = fresh or {}
    if new_subject:
        current = [(consent_id, version, body) for consent_id, (version, body) in fresh.items()]
    else:
        subject: Subject | None = None
        current = []
        for row in await repo.current_of_type(subject_id, "Consent"):
            if row.id in fresh and fresh[row.id][0] == row.version_id:
                current.append((row.id, row.version_id, fresh[row.id][1]))
                continue
            if subject is None:
                subject = await repo.subject(subject_id)
            current.append((row.id, row.version_id, open_version(keys, subject, row)))
    if not current:
        return []
    known_orgs = await repo.organization_ids()

    def resolve_org(system: str, value: str) -> str | None:
        return value if system == ORG_IDENTIFIER_SYSTEM and value in known_orgs else None

    policies = []
    for consent_id, version, body in current:
        resource: Any = orjson.loads(body)
        policies.append(
            consent_policy_from_fhir(
                resource,
                statutory_policies=services.statutory_policies,
                resolve_org=resolve_org,
                consent_id=consent_id,
                version=version,
            )
        )
    return policies


async def refresh_grants(
    services: RecordServices,
    repo: RecordRepository,
    subject_id: str,
    fresh: Mapping[str, tuple[int, bytes]],
    *,
    keys: OpenedKeys,
    new_subject: bool = False,
    indexer: BlindIndexer | None = None,
) -> int:
    """Recompute and store every grant of one migrant; returns how many there are.

    ``fresh``: (version, body) of the Consents written in this transaction;
    ``new_subject``: the migrant was created in this transaction (no stored Consents or grants);
    ``indexer``: the migrant's index key (by default the one their row names; a re-index passes
    the key it moves them to), so that grants and versions agree on label tokens.
    """
    if indexer is None:
        indexer = services.index_keys.for_kid(await repo.subject_index_key(subject_id))
    policies = await load_policies(services, repo, subject_id, fresh, keys=keys, new_subject=new_subject)
    grants = materialise_grants(
        subject_id,
        policies,
        resource_types=sorted(STORED_TYPES),
        label_universe=services.labeler.label_universe,
    )
    tokens: dict[frozenset[str], bytes] = {}
    rows = []
    for g in grants:
        token = tokens.get(g.labels)
        if token is None:
            token = tokens[g.labels] = labels_token(indexer, g.labels)
        rows.append(
            {
                "subject_id": subject_id,
                "organization_id": g.organization_id,
                "purpose": g.purpose,
                "resource_type": g.resource_type,
                "labels_token": token,
                "valid_from": g.valid_from,
                "valid_to": g.valid_to,
                "rule": g.rule,
                "consent_id": g.consent_id,
                "consent_version": g.consent_version,
            }
        )
    await repo.replace_grants(subject_id, rows, new_subject=new_subject)
    return len(grants)

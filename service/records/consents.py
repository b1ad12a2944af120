"""Turning a migrant's stored Consents into disclosure grants, whenever one of them changes.

The grants are what ``security.consent.decide`` answers for every kind of
resource over time (``security.consent_grants``); this module only loads the
Consents, decrypts and parses them, and stores the result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import orjson

from security.consent import AccessRequest, ConsentPolicy, Decision, decide
from security.consent_grants import materialise_grants
from service.consent_model import consent_policy_from_fhir
from service.organizations import ORG_IDENTIFIER_SYSTEM
from service.records.codec import open_version
from service.records.context import RecordServices
from service.records.indexing import labels_token
from service.records.repository import RecordRepository
from service.records.resource_types import STORED_TYPES
from service.store.tables import DisclosureGrant


async def load_policies(
    services: RecordServices,
    repo: RecordRepository,
    subject_id: str,
    fresh: Mapping[str, bytes] | None = None,
) -> list[ConsentPolicy]:
    """The migrant's current Consents as policies. ``fresh`` holds bodies written in this transaction."""
    subject = await repo.subject(subject_id)
    known_orgs = await repo.organization_ids()

    def resolve_org(system: str, value: str) -> str | None:
        return value if system == ORG_IDENTIFIER_SYSTEM and value in known_orgs else None

    policies = []
    for row in await repo.current_of_type(subject_id, "Consent"):
        body = (fresh or {}).get(row.id) or open_version(services.keys, subject, row)
        resource: Any = orjson.loads(body)
        policies.append(
            consent_policy_from_fhir(
                resource,
                statutory_policies=services.statutory_policies,
                resolve_org=resolve_org,
                consent_id=row.id,
                version=row.version_id,
            )
        )
    return policies


async def refresh_grants(
    services: RecordServices, repo: RecordRepository, subject_id: str, fresh: Mapping[str, bytes]
) -> int:
    """Recompute and store every grant of one migrant; returns how many there are."""
    policies = await load_policies(services, repo, subject_id, fresh)
    grants = materialise_grants(
        subject_id,
        policies,
        resource_types=sorted(STORED_TYPES),
        label_universe=services.labeler.label_universe,
    )
    await repo.replace_grants(
        subject_id,
        [
            DisclosureGrant(
                subject_id=subject_id,
                organization_id=g.organization_id,
                purpose=g.purpose,
                resource_type=g.resource_type,
                labels_token=labels_token(services.indexer, g.labels),
                valid_from=g.valid_from,
                valid_to=g.valid_to,
                rule=g.rule,
                consent_id=g.consent_id,
                consent_version=g.consent_version,
            )
            for g in grants
        ],
    )
    return len(grants)


async def explain_denial(
    services: RecordServices,
    repo: RecordRepository,
    request: AccessRequest,
    resource_type: str,
    resource_id: str,
) -> Decision | None:
    """Why an authority was refused a resource, for the audit entry only (the caller still sees 404).

    None when the resource does not exist at all.
    """
    current = await repo.current(resource_type, resource_id)
    if current is None:
        return None
    row = await repo.version(resource_type, resource_id, current.version_id)
    subject = await repo.subject(current.subject_id)
    if row is None:
        return None
    resource: Any = orjson.loads(open_version(services.keys, subject, row))
    labels = services.labeler.existing_labels(resource)
    policies = await load_policies(services, repo, current.subject_id)
    return decide(
        replace(request, patient_id=current.subject_id, resource_type=resource_type, security_labels=labels),
        policies,
    )

"""What the record use-cases need from the running service, and who is acting."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from security.blind_index import BlindIndexer
from security.roles import Role
from service.core.offload import Offload
from service.fhir_validation import ProfileValidator
from service.records.index_keys import IndexKeys
from service.records.labels import SecurityLabeler
from service.records.subject_keys import SubjectKeys


@dataclass(frozen=True)
class RecordServices:
    keys: SubjectKeys
    # The blind-index keys in use (service.records.index_keys): a migrant's tokens are under its own.
    index_keys: IndexKeys
    validator: ProfileValidator
    labeler: SecurityLabeler
    fhir_base_url: str
    # Consent policy URIs that mark a statutory public-health basis rather than voluntary consent.
    statutory_policies: frozenset[str] = frozenset()
    # Follow-up task due days by classification code (settings.followup_due_days).
    followup_due_days: Mapping[str, int] = field(default_factory=dict)
    # Parsing and validation run here, off the event loop.
    offload: Offload = field(default_factory=lambda: Offload(2))

    @property
    def indexer(self) -> BlindIndexer:
        """The indexer of new migrants and of what belongs to none (idempotency keys, cursors)."""
        return self.index_keys.write


@dataclass(frozen=True)
class Actor:
    client_id: str
    organization_id: str
    role: Role
    person: str | None
    purpose: str | None = None

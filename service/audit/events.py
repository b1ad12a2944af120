"""What an audit entry says, as data (IHE BALP shape). No PHI: pseudonymous ids, codes and hashes only."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Action(StrEnum):
    create = "C"
    read = "R"
    update = "U"
    delete = "D"
    execute = "E"


class Outcome(StrEnum):
    success = "0"
    minor_failure = "4"  # refused: bad input, denied, not found
    serious_failure = "8"
    major_failure = "12"


class EventType(StrEnum):
    rest = "rest"  # a FHIR RESTful interaction (DICOM/BALP "rest")
    disclosure = "disclosure"  # BALP privacy disclosure to a recipient authority
    login = "login"  # token issued or refused
    admin = "admin"  # client registered/disabled, keys generated or rotated
    export = "export"


@dataclass(frozen=True)
class AuditAgent:
    client_id: str | None
    organization_id: str | None
    role: str | None
    person: str | None = None
    # The network address of an unidentified caller (IPv6 cut to its /64): aggregated refusals only.
    address: str | None = None


@dataclass(frozen=True)
class Aggregate:
    """Many like refusals in one entry: how many, first and last (UTC ISO instants)."""

    count: int
    first: str
    last: str


@dataclass(frozen=True)
class AuditEntity:
    resource_type: str
    resource_id: str
    version_id: int | None = None
    ciphertext_sha256: str | None = None


@dataclass(frozen=True)
class AuditRecord:
    event_type: EventType
    subtype: (
        str  # the FHIR interaction or operation: read, vread, search-type, create, transaction, token ...
    )
    action: Action
    outcome: Outcome
    agent: AuditAgent
    purpose: str | None = None
    entities: tuple[AuditEntity, ...] = ()
    patient_ids: tuple[str, ...] = ()  # pseudonymous subject ids
    query: str | None = None  # the search's parameter NAMES only, never values
    decision_rule: str | None = None
    consent_id: str | None = None
    consent_version: int | None = None
    detail: str | None = None  # a fixed reason code such as "not-found" or "invalid_client"
    recipients: tuple[str, ...] = field(default=())  # organization ids that received data
    route: str | None = None  # the route template, e.g. "/fhir/AuditEvent/{entry_id}": no values
    aggregate: Aggregate | None = None  # set when the entry stands for many refusals

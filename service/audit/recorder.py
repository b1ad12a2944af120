"""The one audit chokepoint: every audited entry is inserted by `insert_entries`.

A request that writes inserts its entry in its own transaction (`record_audit`),
so the entry commits or rolls back with the action it records (fail closed: if
the insert fails the action fails, and a route answers only after its
transaction committed). A request that only reads hands its entries to
`service.audit.writer`, which commits them, batched with other requests', before
the request answers. Nothing is acknowledged from memory: a crash cannot lose an
entry for an action that took effect.

What is stored is the entry's canonical content (sorted-key compact JSON,
UTF-8): exactly the bytes that the Merkle leaf hashes once the integrator
seals it (`service.audit.log`). A few fields are derived from that content
into columns and `audit_refs` (`derived_columns`, `derived_refs`) so that
auditors can search without parsing every entry; the verifier recomputes them
from the content bytes and names the first entry whose columns disagree.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import orjson
from sqlalchemy import Table, insert
from sqlalchemy.ext.asyncio import AsyncSession

from service.audit import request_audit
from service.audit.events import AuditRecord
from service.store.tables import AuditEntry, AuditRef

log = logging.getLogger(__name__)

CONTENT_VERSION = 1

# audit_refs kinds, searched by the auditor API and the disclosure report.
REF_PATIENT = "patient"
REF_ENTITY = "entity"
REF_RECIPIENT = "recipient"

_MAX_REF = 200


def _instant(moment: datetime) -> str:
    # Always UTC with microseconds, so that the text (hashed) has one spelling.
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def entry_content(record: AuditRecord, *, recorded: datetime, request_id: str, source: str) -> dict[str, Any]:
    """The entry as a JSON object; absent values are left out rather than null."""
    agent = {
        key: value
        for key, value in (
            ("client", record.agent.client_id),
            ("organization", record.agent.organization_id),
            ("role", record.agent.role),
            ("person", record.agent.person),
            ("address", record.agent.address),
        )
        if value is not None
    }
    content: dict[str, Any] = {
        "v": CONTENT_VERSION,
        "recorded": _instant(recorded),
        "type": record.event_type.value,
        "subtype": record.subtype,
        "action": record.action.value,
        "outcome": record.outcome.value,
        "agent": agent,
        "source": source,
        "request": request_id,
    }
    if record.entities:
        content["entities"] = [
            {
                key: value
                for key, value in (
                    ("type", e.resource_type),
                    ("id", e.resource_id),
                    ("version", e.version_id),
                    ("sha256", e.ciphertext_sha256),
                )
                if value is not None
            }
            for e in record.entities
        ]
    optional: tuple[tuple[str, Any], ...] = (
        ("purpose", record.purpose),
        ("patients", list(record.patient_ids) or None),
        ("query", record.query),
        ("detail", record.detail),
        ("recipients", list(record.recipients) or None),
        ("route", record.route),
    )
    for key, value in optional:
        if value is not None:
            content[key] = value
    if record.aggregate is not None:
        content["aggregate"] = {
            "count": record.aggregate.count,
            "first": record.aggregate.first,
            "last": record.aggregate.last,
        }
    if record.decision_rule is not None or record.consent_id is not None:
        decision: dict[str, Any] = {}
        if record.decision_rule is not None:
            decision["rule"] = record.decision_rule
        if record.consent_id is not None:
            decision["consent"] = record.consent_id
        if record.consent_version is not None:
            decision["consentVersion"] = record.consent_version
        content["decision"] = decision
    return content


def canonical(content: dict[str, Any]) -> bytes:
    """Sorted keys, no whitespace, UTF-8: one byte string per entry, forever."""
    return orjson.dumps(content, option=orjson.OPT_SORT_KEYS)


def derived_refs(content: dict[str, Any]) -> set[tuple[str, str]]:
    """The search keys of an entry, from its canonical content (so that verify can recompute them)."""
    refs: set[tuple[str, str]] = set()
    for patient in content.get("patients", ()):
        refs.add((REF_PATIENT, str(patient)))
    for entity in content.get("entities", ()):
        refs.add((REF_ENTITY, f"{entity.get('type')}/{entity.get('id')}"))
        if entity.get("type") == "Patient":
            refs.add((REF_PATIENT, str(entity.get("id"))))
    for org in content.get("recipients", ()):
        refs.add((REF_RECIPIENT, str(org)))
    return {(kind, value) for kind, value in refs if len(value) <= _MAX_REF}


def derived_columns(content: dict[str, Any]) -> dict[str, Any]:
    """The search and accounting columns of an entry, from its canonical content.

    The one definition used both to write them and to verify them: what auditors
    and migrants are shown is selected by these columns, so they must never say
    anything the Merkle-protected content does not.
    """
    agent = content.get("agent") or {}
    return {
        "recorded_at": datetime.fromisoformat(str(content["recorded"]).replace("Z", "+00:00")),
        "event_type": content["type"],
        "subtype": str(content["subtype"])[:64],
        "action": content["action"],
        "outcome": content["outcome"],
        "client_id": agent.get("client"),
    }


async def record_audit(session: AsyncSession, record: AuditRecord, *, request_id: str, source: str) -> None:
    """Insert one audit entry in the caller's transaction.

    Executed at once rather than left for the commit's flush, so that a failure
    surfaces here, before the caller has produced any response.
    """
    await insert_entries(session, [PendingEntry(record, request_id, source)])
    request_audit.entry_in_transaction()


@dataclass(frozen=True)
class PendingEntry:
    """An entry to insert, with the request it belongs to."""

    record: AuditRecord
    request_id: str
    source: str


async def insert_entries(session: AsyncSession, entries: Sequence[PendingEntry]) -> None:
    """Insert entries, of one request or of several (the audit writer's batches), in two statements."""
    if not entries:
        return
    recorded = datetime.now(UTC)
    contents = [
        entry_content(e.record, recorded=recorded, request_id=e.request_id, source=e.source) for e in entries
    ]
    rows = [{**derived_columns(content), "content": canonical(content)} for content in contents]
    connection = await session.connection()  # Core, not the ORM's bulk-insert machinery
    result = await connection.execute(_INSERT_ENTRIES, rows)
    entry_ids = list(result.scalars())
    refs = [
        {"entry_id": entry_id, "kind": kind, "value": value}
        for entry_id, content in zip(entry_ids, contents, strict=True)
        for kind, value in sorted(derived_refs(content))
    ]
    if refs:
        await connection.execute(_INSERT_REFS, refs)


# Built once: SQLAlchemy caches a statement's compiled form by the statement object.
_ENTRIES = cast(Table, AuditEntry.__table__)
_INSERT_ENTRIES = insert(_ENTRIES).returning(_ENTRIES.c.id, sort_by_parameter_order=True)
_INSERT_REFS = insert(cast(Table, AuditRef.__table__))

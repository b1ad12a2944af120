"""The per-migrant accounting of disclosures: who received what about them, when and why.

Built from the audit log's disclosure entries (the same rows the Merkle log
protects), for a clinic to hand to the migrant on request.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from service.audit.events import EventType, Outcome
from service.audit.recorder import REF_PATIENT, derived_refs
from service.store.tables import AuditEntry, AuditRef

log = logging.getLogger(__name__)

# The subtype of a disclosure entry that tells an authority a consent it received data under was
# withdrawn or narrowed (service.subscriptions.changes writes them): the Consent's id is disclosed.
WITHDRAWAL_NOTICE = "withdrawal-notice"


@dataclass(frozen=True)
class Disclosure:
    entry_id: int
    recorded: datetime
    organizations: tuple[str, ...]  # the receiving organizations' ids
    purpose: str | None
    resource_types: tuple[str, ...]
    consent: str | None  # "Consent/<id>/_history/<version>" that permitted it
    # What kind of disclosure: the interaction that disclosed data (read, search-type ...), or
    # "withdrawal-notice" (the authority was told a consent it received data under was
    # withdrawn or narrowed; ``detail`` says whether it was notified or had no subscription).
    subtype: str = ""
    detail: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "entry": self.entry_id,
            "recorded": self.recorded.isoformat().replace("+00:00", "Z"),
            "organizations": list(self.organizations),
            "purpose": self.purpose,
            "resourceTypes": list(self.resource_types),
            "consent": self.consent,
            "subtype": self.subtype,
            "detail": self.detail,
        }


def _disclosure(entry_id: int, content: bytes) -> Disclosure:
    data: dict[str, Any] = orjson.loads(content)
    recipients = tuple(data.get("recipients", ())) or tuple(
        org for org in (data.get("agent", {}).get("organization"),) if org
    )
    decision = data.get("decision", {})
    consent = decision.get("consent")
    if consent is not None:
        if "/" not in consent:
            consent = f"Consent/{consent}"
        if "consentVersion" in decision:
            consent += f"/_history/{decision['consentVersion']}"
    return Disclosure(
        entry_id=entry_id,
        recorded=datetime.fromisoformat(data["recorded"].replace("Z", "+00:00")),
        organizations=recipients,
        purpose=data.get("purpose"),
        resource_types=tuple(sorted({e["type"] for e in data.get("entities", ()) if e.get("type")})),
        consent=consent,
        subtype=str(data.get("subtype", "")),
        detail=data.get("detail"),
    )


def _says_disclosure_about(content: bytes, patient_id: str) -> bool:
    """Whether the Merkle-protected content itself says: a successful disclosure about this migrant.

    The rows are selected by columns and refs (indexed); this keeps a row whose columns were
    edited to say more than its content out of the report. Rows whose columns were edited to
    say less are found by `mhr audit verify`, which recomputes every column from the content.
    """
    data: dict[str, Any] = orjson.loads(content)
    return (
        data.get("type") == EventType.disclosure.value
        and data.get("outcome") == Outcome.success.value
        and (REF_PATIENT, patient_id) in derived_refs(data)
    )


async def anything_disclosed(session: AsyncSession, patient_ids: Iterable[str]) -> bool:
    """Was anything about any of these migrants (pseudonyms) disclosed successfully? One
    index-driven EXISTS (a consent change that concerns nobody who received data costs this)."""
    wanted = sorted(set(patient_ids))
    if not wanted:
        return False
    found = await session.execute(
        select(AuditRef.entry_id)
        .join(AuditEntry, AuditEntry.id == AuditRef.entry_id)
        .where(
            AuditRef.kind == REF_PATIENT,
            AuditRef.value.in_(wanted),
            AuditEntry.event_type == EventType.disclosure.value,
            AuditEntry.outcome == Outcome.success.value,
        )
        .limit(1)
    )
    return found.first() is not None


async def disclosures_for_patient(session: AsyncSession, patient_id: str) -> list[Disclosure]:
    """Every successful disclosure about ``patient_id`` (pseudonym), oldest first."""
    rows = await session.execute(
        select(AuditEntry.id, AuditEntry.content)
        .where(
            AuditEntry.event_type == EventType.disclosure.value,
            AuditEntry.outcome == Outcome.success.value,
            AuditEntry.id.in_(
                select(AuditRef.entry_id).where(AuditRef.kind == REF_PATIENT, AuditRef.value == patient_id)
            ),
        )
        .order_by(AuditEntry.recorded_at, AuditEntry.id)
    )
    found = []
    for entry_id, content in rows:
        if _says_disclosure_about(bytes(content), patient_id):
            found.append(_disclosure(int(entry_id), bytes(content)))
        else:
            log.error("audit entry columns disagree with its content", extra={"entry_id": int(entry_id)})
    return found

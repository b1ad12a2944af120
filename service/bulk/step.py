"""One checkpointed step of an export: the next batch of migrants, written out and accounted for.

A step, inside the transaction that completes its job (service.jobs):

1. takes the export row (row-locked, so that a cancel waits) and the next
   ``MHR_EXPORT_SUBJECTS_PER_STEP`` candidate migrants after the checkpoint (those with a
   disclosure grant for this authority and purpose on a requested type);
2. fetches those migrants' current versions filtered by the one visibility predicate
   (``grant_predicate.visible``, through ``RecordRepository.search``), each decided on that
   version's own type, labels and subject *at the time it is written out*, with the grant that
   admits it; decrypts them with one unwrap per migrant (``OpenedKeys``); for a Group export keeps
   only the Group's members; drops references to what the authority may not see
   (``ReferenceMask``, as every read does);
3. appends one sealed record per resource type to the export's files, at their committed
   lengths (bytes an earlier, killed attempt left are cut off first), fsynced;
4. writes the disclosure accounting: one audit entry per migrant (per deciding consent, so each
   entry names what permitted it), committed before any file can be downloaded;
5. moves the checkpoint (last migrant, file lengths) and commits.

A step killed anywhere before its commit leaves the checkpoint where it was: the next attempt
writes the same migrants again over the uncommitted bytes, so every resource is in the output
exactly once. Each migrant is written by one step, whole, so the accounting is one entry each.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import orjson
from sqlalchemy.ext.asyncio import AsyncSession

from service.audit.events import Action, AuditAgent, AuditEntity, AuditRecord, EventType, Outcome
from service.audit.recorder import PendingEntry, insert_entries
from service.bulk.files import ExportFiles, open_file_key
from service.bulk.groups import says_class_b
from service.bulk.repository import ExportRepository
from service.core.request_context import SOURCE
from service.domain.errors import DomainError, Gone
from service.records.codec import open_version
from service.records.grant_predicate import Audience, GrantFilter
from service.records.masking import ReferenceMask
from service.records.repository import RecordRepository, SubjectKey, VersionRow
from service.records.subject_keys import OpenedKeys
from service.store.tables import BulkExport, BulkExportFile

if TYPE_CHECKING:
    from service.runtime.providers import Runtime

log = logging.getLogger("mhr.bulk")

QUEUED, RUNNING, COMPLETE, FAILED, CANCELLED, EXPIRED = (
    "queued",
    "running",
    "complete",
    "failed",
    "cancelled",
    "expired",
)
ERROR_TYPE = "OperationOutcome"  # the file of per-resource problems (the manifest's "error")
# A step runs in a server process's event loop, beside its requests: it gives them the loop back
# every this many versions decrypted, so that an interactive read waits for a fraction of a
# millisecond of export work, not for a whole step's.
_ROWS_BETWEEN_YIELDS = 64


@dataclass(frozen=True)
class StepResult:
    more: bool  # another step is needed
    subjects: int
    resources: int


def export_files(runtime: Runtime) -> ExportFiles:
    return ExportFiles(runtime.settings.export_dir)


def _now() -> datetime:
    return datetime.now(UTC)


async def run_step(session: AsyncSession, runtime: Runtime, export_id: str) -> StepResult:
    exports = ExportRepository(session)
    export = await exports.locked(export_id)
    if export is None or export.state not in (QUEUED, RUNNING) or export.wrapped_key is None:
        return StepResult(more=False, subjects=0, resources=0)  # cancelled or gone: nothing to do
    export.state = RUNNING
    limit = runtime.settings.export_subjects_per_step
    grant = GrantFilter(export.organization_id, export.purpose, _now())
    audience = Audience(grant=grant)
    types = list(export.types)
    subjects = await exports.next_subjects(grant, types, after=export.cursor_subject, limit=limit)
    written = 0
    disclosed = 0
    if subjects:
        keys = runtime.records.keys.opened()
        try:
            written, disclosed = await _write_batch(session, runtime, export, subjects, audience, keys)
        finally:
            keys.close()
        export.cursor_subject = subjects[-1]
        export.subjects_done += disclosed
        export.resources_done += written
    more = len(subjects) == limit
    if not more:
        now = _now()
        export.state = COMPLETE
        export.completed_at = now
        export.expires_at = now + timedelta(hours=runtime.settings.export_retention_hours)
    await session.flush()
    return StepResult(more=more, subjects=disclosed, resources=written)


async def _write_batch(
    session: AsyncSession,
    runtime: Runtime,
    export: BulkExport,
    subjects: list[str],
    audience: Audience,
    keys: OpenedKeys,
) -> tuple[int, int]:
    """Write these migrants' visible resources; returns (resources written, migrants disclosed)."""
    records = RecordRepository(session)
    updated = [("le", export.until)] + ([("gt", export.since)] if export.since is not None else [])
    rows = await records.current_of_subjects(subjects, list(export.types), audience, updated)
    wrapped = await records.subject_keys(subjects)
    problems: list[bytes] = []
    opened: list[tuple[VersionRow, bytes]] = []
    for index, row in enumerate(rows):
        if index % _ROWS_BETWEEN_YIELDS == 0:
            await asyncio.sleep(0)
        body = _open(keys, wrapped, row, problems)
        if body is not None:
            opened.append((row, body))
    if export.group_id is not None:
        members = await _class_b_members(records, audience, subjects, keys, wrapped)
        opened = [(row, body) for row, body in opened if row.subject_id in members]
    known = _KnownVisible(records, rows)
    bodies = await ReferenceMask(known, audience, runtime.settings.fhir_base_url).apply(opened)
    lines: dict[str, list[bytes]] = defaultdict(list)
    for (row, _), body in zip(opened, bodies, strict=True):
        lines[row.resource_type].append(body)
    if problems:
        lines[ERROR_TYPE].extend(problems)
    await _append(session, runtime, export, lines)
    audit = _disclosures(export, [row for row, _ in opened])
    await insert_entries(session, [PendingEntry(record, f"export-{export.id}", SOURCE) for record in audit])
    return len(opened), len({row.subject_id for row, _ in opened})


class _KnownVisible(RecordRepository):
    """The store's reference check, answering first from the batch itself.

    An exam's resources mostly name each other. Every row the batch fetched is a current version
    the predicate admitted in this very transaction, for this audience, at this time: a reference
    to it (current, or that version) is visible without asking again. Everything else is asked of
    the store, with the same predicate, as on every read."""

    def __init__(self, records: RecordRepository, rows: list[VersionRow]) -> None:
        super().__init__(records.session)
        self.known: set[tuple[str, str, int | None]] = set()
        for row in rows:
            self.known.add((row.resource_type, row.id, None))
            self.known.add((row.resource_type, row.id, row.version_id))

    async def visible_references(
        self, refs: Iterable[tuple[str, str, int | None]], audience: Audience
    ) -> set[tuple[str, str, int | None]]:
        wanted = set(refs)
        found = wanted & self.known
        rest = wanted - found
        if rest:
            found |= await super().visible_references(rest, audience)
        return found


def _open(
    keys: OpenedKeys, wrapped: dict[str, SubjectKey], row: VersionRow, problems: list[bytes]
) -> bytes | None:
    """A version's bytes; None for one that cannot be disclosed (an erased migrant's: left out
    silently, as it no longer exists; one failing its integrity check: left out and reported)."""
    try:
        return open_version(keys, wrapped.get(row.subject_id), row)
    except Gone:
        return None
    except DomainError:
        problems.append(
            orjson.dumps(
                {
                    "resourceType": "OperationOutcome",
                    "issue": [
                        {
                            "severity": "error",
                            "code": "exception",
                            "diagnostics": f"{row.resource_type}/{row.id}/_history/{row.version_id} "
                            "could not be read and was left out of the export",
                        }
                    ],
                }
            )
        )
        return None


async def _class_b_members(
    records: RecordRepository,
    audience: Audience,
    subjects: list[str],
    keys: OpenedKeys,
    wrapped: dict[str, SubjectKey],
) -> set[str]:
    """The migrants of the batch whose current classification this authority may see says Class B."""
    members: set[str] = set()
    for row in await records.current_of_subjects(subjects, ["Observation"], audience):
        if row.subject_id in members:
            continue
        body = _open(keys, wrapped, row, [])
        if body is not None and b"exam-classification" in body and says_class_b(orjson.loads(body)):
            members.add(row.subject_id)
    return members


async def _append(
    session: AsyncSession, runtime: Runtime, export: BulkExport, lines: dict[str, list[bytes]]
) -> None:
    if not lines:
        return
    assert export.wrapped_key is not None
    cipher = open_file_key(runtime.keys, export.id, export.wrapped_key)
    files = export_files(runtime)
    exports = ExportRepository(session)
    for resource_type in sorted(lines):
        found = await exports.file(export.id, resource_type)
        if found is None:
            found = BulkExportFile(
                export_id=export.id, resource_type=resource_type, byte_length=0, records=0, resources=0
            )
            session.add(found)
        body = b"\n".join(lines[resource_type]) + b"\n"
        record = cipher.seal(resource_type, found.records, body)
        found.byte_length = files.append(export.id, resource_type, found.byte_length, record)
        found.records += 1
        found.resources += len(lines[resource_type])


def _disclosures(export: BulkExport, rows: list[VersionRow]) -> list[AuditRecord]:
    """One privacy-disclosure entry per migrant (and deciding consent) written out in this step."""
    by_decision: dict[tuple[str, str, str, int], list[VersionRow]] = defaultdict(list)
    for row in rows:
        grant = row.grant
        decided = (grant.rule, grant.consent_id, grant.consent_version) if grant else ("", "", 0)
        key = (row.subject_id, *decided)
        by_decision[key].append(row)
    agent = AuditAgent(export.client_id, export.organization_id, "authority")
    return [
        AuditRecord(
            event_type=EventType.disclosure,
            subtype="export",
            action=Action.execute,
            outcome=Outcome.success,
            agent=agent,
            purpose=export.purpose,
            entities=tuple(
                AuditEntity(r.resource_type, r.id, r.version_id, r.ciphertext_sha256) for r in disclosed
            ),
            patient_ids=(subject_id,),
            decision_rule=rule or None,
            consent_id=consent_id or None,
            consent_version=consent_version or None,
            recipients=(export.organization_id,),
            detail=f"export {export.id}",
        )
        for (subject_id, rule, consent_id, consent_version), disclosed in by_decision.items()
    ]

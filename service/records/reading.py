"""Reads, version reads, history and search, answered from the decrypted canonical bytes.

Bytes are spliced into Bundles without parsing them again: rebuilding models
costs ~17 ms per exam (DESIGN.md), splicing costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson

from security.envelope import SubjectCipher
from service.errors import FhirError, not_found
from service.records.access import TENANCY, Permit, Visibility
from service.records.codec import open_version
from service.records.context import RecordServices
from service.records.repository import RecordRepository, SearchFilter, VersionRow
from service.records.search_params import ParsedSearch
from service.store.tables import StoredResource, Subject

MAX_HISTORY = 100
# value-concept filters decrypted resources: bounded so one search cannot decrypt the world.
MAX_VALUE_SCAN = 5000
MAX_EVERYTHING = 1000


@dataclass(frozen=True)
class ReadResult:
    row: VersionRow
    body: bytes
    permit: Permit = field(default=TENANCY, compare=False)

    @property
    def etag(self) -> str:
        return f'W/"{self.row.version_id}"'

    @property
    def last_modified(self) -> str:
        return self.row.last_updated.astimezone(UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")


@dataclass(frozen=True)
class SearchResult:
    rows: list[ReadResult]
    total: int
    has_next: bool


class Reader:
    def __init__(self, services: RecordServices, repo: RecordRepository) -> None:
        self.services = services
        self.repo = repo
        self._subjects: dict[str, Subject | None] = {}
        self._ciphers: dict[str, SubjectCipher] = {}

    async def _open(self, row: VersionRow, permit: Permit = TENANCY) -> ReadResult:
        if row.subject_id not in self._subjects:
            self._subjects[row.subject_id] = await self.repo.subject(row.subject_id)
        return ReadResult(row, open_version(self.services.keys, self._subjects[row.subject_id], row), permit)

    async def _visible(
        self, visibility: Visibility, resource_type: str, resource_id: str
    ) -> tuple[StoredResource, Permit]:
        current = await self.repo.current(resource_type, resource_id)
        permit = await visibility.permits(self.repo, current) if current is not None else None
        if current is None or permit is None:
            raise not_found(resource_type)
        return current, permit

    async def read(self, visibility: Visibility, resource_type: str, resource_id: str) -> ReadResult:
        found = await self.repo.current_with_version(resource_type, resource_id)
        permit = await visibility.permits(self.repo, found[0]) if found is not None else None
        if found is None or permit is None:
            raise not_found(resource_type)
        _, row, subject = found
        self._subjects[row.subject_id] = subject
        return await self._open(row, permit)

    async def vread(
        self, visibility: Visibility, resource_type: str, resource_id: str, version_id: int
    ) -> ReadResult:
        _, permit = await self._visible(visibility, resource_type, resource_id)
        row = await self.repo.version(resource_type, resource_id, version_id)
        if row is None:
            raise FhirError.single(404, "not-found", f"{resource_type} version not found")
        return await self._open(row, permit)

    async def history(self, visibility: Visibility, resource_type: str, resource_id: str) -> list[ReadResult]:
        _, permit = await self._visible(visibility, resource_type, resource_id)
        rows = await self.repo.history(resource_type, resource_id, MAX_HISTORY)
        return [await self._open(r, permit) for r in rows]

    async def search(self, visibility: Visibility, flt: SearchFilter, parsed: ParsedSearch) -> SearchResult:
        """Filtered in SQL before paging, so totals and pages hold only what may be seen."""
        flt = visibility.restrict(flt)
        if parsed.value_concepts:
            return await self._search_values(flt, parsed)
        total = await self.repo.count(flt)
        rows = await self.repo.search(
            flt, newest_first=parsed.newest_first, limit=parsed.count, offset=parsed.offset
        )
        opened = await self.open_rows(flt, rows)
        return SearchResult(opened, total, parsed.offset + len(rows) < total)

    async def _search_values(self, flt: SearchFilter, parsed: ParsedSearch) -> SearchResult:
        rows = await self.repo.search(flt, newest_first=parsed.newest_first, limit=MAX_VALUE_SCAN, offset=0)
        matching = []
        for result in await self.open_rows(flt, rows):
            resource = orjson.loads(result.body)
            if all(_has_value_concept(resource, alternatives) for alternatives in parsed.value_concepts):
                matching.append(result)
        page = matching[parsed.offset : parsed.offset + parsed.count]
        return SearchResult(page, len(matching), parsed.offset + len(page) < len(matching))

    async def everything(
        self, visibility: Visibility, patient_id: str, types: Sequence[str]
    ) -> list[ReadResult]:
        """Patient/$everything: the patient and every resource of theirs the caller may see."""
        results = [await self.read(visibility, "Patient", patient_id)]
        for resource_type in types:
            if resource_type == "Patient" or len(results) >= MAX_EVERYTHING:
                continue
            flt = visibility.restrict(SearchFilter(resource_type=resource_type, subject_ids=[patient_id]))
            rows = await self.repo.search(
                flt, newest_first=True, limit=MAX_EVERYTHING - len(results), offset=0
            )
            results.extend(await self.open_rows(flt, rows))
        return results

    async def open_rows(self, flt: SearchFilter, rows: Sequence[VersionRow]) -> list[ReadResult]:
        missing = {r.subject_id for r in rows} - self._subjects.keys()
        if missing:  # one query for the page's subject keys, not one per row
            found = await self.repo.subjects(missing)
            self._subjects.update({subject_id: found.get(subject_id) for subject_id in missing})
        permits = await self._permits(flt, rows)
        return [
            await self._open(r, permits.get((r.subject_id, r.resource_type, r.labels_token), TENANCY))
            for r in rows
        ]

    async def _permits(
        self, flt: SearchFilter, rows: Sequence[VersionRow]
    ) -> dict[tuple[str, str, bytes | None], Permit]:
        """Which grant let each row through (named in the disclosure's audit entry)."""
        if flt.grant is None or not rows:
            return {}
        grants = await self.repo.grants_for_subjects(flt.grant, {r.subject_id for r in rows})
        return {
            (g.subject_id, g.resource_type, g.labels_token): Permit(g.rule, g.consent_id, g.consent_version)
            for g in grants
        }


def bundle_bytes(
    bundle_type: str,
    entries: Sequence[tuple[str, bytes, bytes | None]],
    *,
    total: int | None = None,
    links: Sequence[tuple[str, str]] = (),
) -> bytes:
    """A Bundle around already-serialised resources: (fullUrl, resource bytes, extra entry JSON)."""
    head: dict[str, object] = {
        "resourceType": "Bundle",
        "type": bundle_type,
        "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
    }
    if total is not None:
        head["total"] = total
    if links:
        head["link"] = [{"relation": rel, "url": url} for rel, url in links]
    parts = []
    for full_url, body, extra in entries:
        part = b'{"fullUrl":' + orjson.dumps(full_url) + b',"resource":' + body
        if extra:
            part += b"," + extra
        parts.append(part + b"}")
    return orjson.dumps(head)[:-1] + b',"entry":[' + b",".join(parts) + b"]}"


def _has_value_concept(resource: dict[str, object], alternatives: list[tuple[str, str]]) -> bool:
    """Does the Observation's value (or a component's value) carry one of these codings?"""
    concepts: list[object] = [resource.get("valueCodeableConcept")]
    components = resource.get("component")
    if isinstance(components, list):
        concepts.extend(c.get("valueCodeableConcept") for c in components if isinstance(c, dict))
    for concept in concepts:
        codings = concept.get("coding") if isinstance(concept, dict) else None
        for coding in codings if isinstance(codings, list) else []:
            if not isinstance(coding, dict):
                continue
            for system, code in alternatives:
                if coding.get("code") == code and (not system or coding.get("system") == system):
                    return True
    return False

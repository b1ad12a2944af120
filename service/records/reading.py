"""Reads, version reads, history and search, answered from the decrypted canonical bytes.

Bytes are spliced into Bundles without parsing them again: rebuilding models
costs ~17 ms per exam (DESIGN.md), splicing costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import orjson

from service.domain.errors import Gone, Invalid, NotFound
from service.records.access import TENANCY, Permit, Visibility
from service.records.codec import WrappedKey, erased, open_version
from service.records.context import RecordServices
from service.records.masking import ReferenceMask
from service.records.operation_params import PageParameters
from service.records.paging import PageCursor, PagePosition
from service.records.repository import RecordRepository, SearchFilter, VersionRow
from service.records.search_params import ParsedSearch
from service.records.subject_keys import OpenedKeys

# value-concept filters decrypted resources: bounded so one search cannot decrypt the world.
MAX_VALUE_SCAN = 5000
# Where a newest-first $everything starts when its first page held only the Patient: after
# nothing (later than any row).
START_OF_EVERYTHING = PagePosition(datetime(9999, 12, 31, tzinfo=UTC), "")


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
class HistoryResult:
    rows: list[ReadResult]
    total: int  # every version the caller may see that the filters admit (from this page on)
    has_next: bool


def history_position(row: VersionRow) -> PagePosition:
    """Where a history page ended: versions are ordered by number, which the position carries."""
    return PagePosition(row.last_updated, str(row.version_id))


def history_version(position: PagePosition) -> int:
    """The version a next history page starts below (from a cursor this service signed)."""
    number = position.resource_id
    if not (number.isascii() and number.isdigit() and len(number) <= 9):
        raise Invalid("_cursor is not a cursor of this history", expression="_cursor")
    return int(number)


@dataclass(frozen=True)
class SearchResult:
    rows: list[ReadResult]
    total: int | None  # None: not counted (_total=none)
    has_next: bool
    resume: PagePosition | None = None  # where the next page starts, if not after the last row

    @property
    def last_position(self) -> PagePosition | None:
        if self.resume is not None:
            return self.resume
        last = self.rows[-1].row if self.rows else None
        return PagePosition(last.last_updated, last.id) if last else None


class Reader:
    """One request's reads. Its subject keys are the request's own: pass the request's
    :class:`OpenedKeys` when it has some already, else the reader opens its own."""

    def __init__(
        self, services: RecordServices, repo: RecordRepository, keys: OpenedKeys | None = None
    ) -> None:
        self.services = services
        self.repo = repo
        self.keys = keys or services.keys.opened()
        self._subjects: dict[str, WrappedKey | None] = {}

    async def _open(self, row: VersionRow) -> ReadResult:
        """Decrypt one version the store already decided the caller may see (never before)."""
        if row.subject_id not in self._subjects:
            found = await self.repo.subject_keys([row.subject_id])
            self._subjects[row.subject_id] = found.get(row.subject_id)
        body = open_version(self.keys, self._subjects[row.subject_id], row)
        return ReadResult(row, body, Visibility.permit_of(row))

    async def _disclose(self, visibility: Visibility, results: list[ReadResult]) -> list[ReadResult]:
        """The one way out: references to anything the caller may not see are dropped here, for
        every path (read, vread, history, search, $everything)."""
        mask = ReferenceMask(self.repo, visibility.audience, self.services.fhir_base_url)
        bodies = await mask.apply([(r.row, r.body) for r in results])
        return [
            r if body is r.body else replace(r, body=body) for r, body in zip(results, bodies, strict=True)
        ]

    async def _absent(self, visibility: Visibility, resource_type: str, resource_id: str) -> NotFound | Gone:
        """404 for what the caller may not see; 410 Gone to the clinic that submitted a resource of
        a migrant since erased. The check runs on every clinic miss alike, so its cost tells
        another clinic nothing; authorities and everyone else get 404 (no existence oracle)."""
        organization_id = visibility.audience.organization_id
        if organization_id is not None and await self.repo.erased_resource(
            resource_type, resource_id, organization_id
        ):
            return erased(resource_type)
        # One message for "does not exist" and "exists but not yours": no existence oracle.
        return NotFound(f"{resource_type} not found")

    async def _read_one(self, visibility: Visibility, resource_type: str, resource_id: str) -> ReadResult:
        found = await self.repo.current_for_read(resource_type, resource_id, visibility.audience)
        if found is None:  # absent and withheld alike: nothing decrypted, nothing unwrapped
            raise await self._absent(visibility, resource_type, resource_id)
        self._subjects[found.row.subject_id] = found.subject
        return await self._open(found.row)

    async def read(self, visibility: Visibility, resource_type: str, resource_id: str) -> ReadResult:
        result = await self._read_one(visibility, resource_type, resource_id)
        return (await self._disclose(visibility, [result]))[0]

    async def vread(
        self, visibility: Visibility, resource_type: str, resource_id: str, version_id: int
    ) -> ReadResult:
        """One version, decided on that version's own labels, type and subject: a withheld
        version answers exactly like one that does not exist."""
        found = await self.repo.version_for_read(resource_type, resource_id, version_id, visibility.audience)
        if found is None:
            raise await self._absent(visibility, resource_type, resource_id)
        self._subjects[found.row.subject_id] = found.subject
        return (await self._disclose(visibility, [await self._open(found.row)]))[0]

    async def history(
        self,
        visibility: Visibility,
        resource_type: str,
        resource_id: str,
        page: PageParameters,
        before_version: int | None = None,
    ) -> HistoryResult:
        """A page of the versions the caller may see, newest first; a resource of which the caller
        may see no version at all answers 404 like an absent id (a filter that leaves nothing
        answers an empty page). With ``page.total_only`` nothing is decrypted."""
        wanted = 0 if page.total_only else page.count
        rows, total = await self.repo.history(
            resource_type,
            resource_id,
            visibility.audience,
            wanted + 1,  # one more than the page: is there a next one?
            since=page.since,
            at=page.at,
            before_version=before_version,
        )
        if not rows:
            filtered = page.since is not None or page.at is not None or before_version is not None
            unfiltered = (
                await self.repo.history(resource_type, resource_id, visibility.audience, 1)
                if filtered
                else ([], 0)
            )
            if not unfiltered[0]:
                raise await self._absent(visibility, resource_type, resource_id)
        opened = [await self._open(r) for r in rows[:wanted]]
        has_next = not page.total_only and len(rows) > wanted
        return HistoryResult(await self._disclose(visibility, opened), total, has_next)

    async def search(
        self, visibility: Visibility, flt: SearchFilter, parsed: ParsedSearch, cursor: PageCursor | None
    ) -> SearchResult:
        """Filtered in SQL before paging, so totals and pages hold only what may be seen.

        The total is counted on the first page only; later pages carry it in their cursor."""
        flt = visibility.restrict(flt)
        if parsed.value_concepts:
            found = await self._search_values(visibility, flt, parsed)
            return SearchResult([], found.total, False) if parsed.total_only else found
        if parsed.total_only:  # _count=0, _summary=count: counted, nothing fetched or decrypted
            return SearchResult([], await self.repo.count(flt), False)
        if cursor is not None:
            total = cursor.total
        else:
            total = await self.repo.count(flt) if parsed.count_total else None
        rows = await self.repo.search(
            flt,
            newest_first=parsed.newest_first,
            limit=parsed.count + 1,  # one more than the page: is there a next one?
            offset=parsed.offset,
            after=cursor.after if cursor else None,
        )
        opened = await self._disclose(visibility, await self.open_rows(rows[: parsed.count]))
        return SearchResult(opened, total, len(rows) > parsed.count)

    async def _search_values(
        self, visibility: Visibility, flt: SearchFilter, parsed: ParsedSearch
    ) -> SearchResult:
        rows = await self.repo.search(flt, newest_first=parsed.newest_first, limit=MAX_VALUE_SCAN, offset=0)
        matching = []
        for result in await self.open_rows(rows):
            resource = orjson.loads(result.body)
            if all(_has_value_concept(resource, alternatives) for alternatives in parsed.value_concepts):
                matching.append(result)
        page = await self._disclose(visibility, matching[parsed.offset : parsed.offset + parsed.count])
        return SearchResult(page, len(matching), parsed.offset + len(page) < len(matching))

    async def everything(
        self,
        visibility: Visibility,
        patient_id: str,
        types: Sequence[str],
        page: PageParameters,
        after: PagePosition | None = None,
        total: int | None = None,
    ) -> SearchResult:
        """Patient/$everything: the patient, then every resource of theirs the caller may see,
        newest first, in one search over all the types (not one per type), a page at a time.

        The Patient comes first on the first page; the rest pages by position like a search.
        ``after``/``total``: a next page's position and the total counted on the first page."""
        patient = await self._read_one(visibility, "Patient", patient_id)  # 404 before anything
        since = page.since
        first = after is None
        with_patient = first and "Patient" in types and (since is None or patient.row.last_updated >= since)
        others = [t for t in types if t != "Patient"]
        flt = visibility.restrict(
            SearchFilter(
                resource_type="",
                resource_types=others,
                subject_ids=[patient_id],
                updated_ranges=[("ge", since)] if since is not None else [],
                match_nothing=not others,
            )
        )
        if first:
            total = int(with_patient) + (await self.repo.count(flt) if others else 0)
        if page.total_only:
            return SearchResult([], total, False)
        room = page.count - int(with_patient)
        rows = await self.repo.search(flt, newest_first=True, limit=room + 1, after=after) if others else []
        shown = rows[:room]
        results = ([patient] if with_patient else []) + await self.open_rows(shown)
        opened = await self._disclose(visibility, results)
        resume = PagePosition(shown[-1].last_updated, shown[-1].id) if shown else START_OF_EVERYTHING
        return SearchResult(opened, total, len(rows) > room, resume)

    async def open_rows(self, rows: Sequence[VersionRow]) -> list[ReadResult]:
        missing = {r.subject_id for r in rows} - self._subjects.keys()
        if missing:  # one query for the page's subject keys, not one per row
            found = await self.repo.subject_keys(missing)
            self._subjects.update({subject_id: found.get(subject_id) for subject_id in missing})
        return [await self._open(r) for r in rows]


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
    if not parts:  # FHIR JSON has no empty arrays
        return orjson.dumps(head)
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

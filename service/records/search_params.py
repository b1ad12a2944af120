"""FHIR search parameters of the store, parsed into a ``SearchFilter`` of blind-index values and ranges."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from security.blind_index import BlindIndexer
from service.domain.errors import Invalid, NotFound
from service.records.fhir_dates import parse_range
from service.records.indexing import code_token
from service.records.repository import SearchFilter

_CLINICAL = ("patient", "_lastUpdated", "_id", "identifier")
SEARCH_PARAMETERS: dict[str, frozenset[str]] = {
    "Patient": frozenset({"identifier", "_lastUpdated", "_id"}),
    "Encounter": frozenset({*_CLINICAL, "date", "type"}),
    "Observation": frozenset({*_CLINICAL, "date", "code", "value-concept"}),
    "DiagnosticReport": frozenset({*_CLINICAL, "date", "code"}),
    "Immunization": frozenset({*_CLINICAL, "date", "vaccine-code", "code"}),
    "Condition": frozenset({*_CLINICAL, "code"}),
    "ImagingStudy": frozenset(_CLINICAL),
    "MedicationAdministration": frozenset({*_CLINICAL, "code"}),
    "DocumentReference": frozenset({*_CLINICAL, "date", "type"}),
    "Consent": frozenset(_CLINICAL),
    "Provenance": frozenset({"patient", "_lastUpdated", "_id"}),  # no identifier element in R4
    "Specimen": frozenset(_CLINICAL),
}
# _totalMethod is HAPI's and fhirpy's way to ask for the count (fhirpy's count() sends it):
# accepted and answered like _total=accurate.
CONTROL_PARAMETERS = frozenset(
    {"_count", "_sort", "_offset", "_cursor", "_total", "_summary", "_elements", "_totalMethod"}
)
# Parameters of every interaction, answered by the response layer (service.api.formats).
GENERAL_PARAMETERS = frozenset({"_format", "_pretty"})
# A migrant's identifiers (a passport number) never go into a URL the service writes: the
# links of a search by identifier name it without them, and its cursor carries their
# blind indexes, sealed (service.records.paging).
IDENTIFYING_PARAMETERS = frozenset({"identifier"})
DEFAULT_COUNT = 20
MAX_COUNT = 100
MAX_OFFSET = 10_000
MAX_VALUES = 50
_TOKEN_PARAMS = frozenset({"code", "vaccine-code", "type"})
_PREFIXES = ("eq", "ge", "gt", "le", "lt")
_ELEMENT_NAME = re.compile(r"^[a-z][A-Za-z0-9]{0,63}$")
MAX_ELEMENTS = 50


def _bad(diagnostics: str, param: str, code: str = "invalid") -> Invalid:
    # The expression names the parameter, never its value (a value can be an identifier).
    return Invalid(diagnostics, expression=param, code=code)


@dataclass
class ParsedSearch:
    filter: SearchFilter
    count: int
    offset: int
    newest_first: bool
    echo: list[tuple[str, str]]  # the parameters understood, for self/next links
    cursor: str | None = None  # the next link's position (service.records.paging), still sealed
    count_total: bool = True  # _total=none: the client does not want Bundle.total
    # value-concept is matched on decrypted resources, within what the caller may see:
    # no index of results exists, in clear or blind.
    value_concepts: list[list[tuple[str, str]]] = field(default_factory=list)
    # The blind-index groups of the identifying parameters, for the cursor to carry.
    hidden: list[tuple[str, list[bytes]]] = field(default_factory=list)
    summary_count: bool = False  # _summary=count: the total, no entries
    elements: tuple[str, ...] | None = None  # _elements: the top-level elements to return

    @property
    def linkable(self) -> list[tuple[str, str]]:
        """The parameters understood that may be written into a link: all but identifiers."""
        return [(n, v) for n, v in self.echo if n.partition(":")[0] not in IDENTIFYING_PARAMETERS]

    @property
    def total_only(self) -> bool:
        return self.summary_count or self.count == 0


def _split(value: str, param: str) -> list[str]:
    values = [v for v in value.split(",") if v]
    if not values or len(values) > MAX_VALUES:
        raise _bad("a search parameter needs 1 to 50 values", param)
    return values


def _tokens(value: str, param: str) -> list[tuple[str, str]]:
    """``[system|]code`` alternatives of a token parameter; an empty system matches any."""
    tokens = []
    for item in _split(value, param):
        system, bar, code = item.partition("|")
        if not bar:
            system, code = "", item
        if not code:
            raise _bad("a token parameter needs [system|]code", param)
        tokens.append((system, code))
    return tokens


def _date_bounds(param: str, raw: str) -> list[tuple[str, datetime]]:
    prefix = raw[:2] if raw[:2] in _PREFIXES else "eq"
    text = raw[2:] if raw[:2] in _PREFIXES else raw
    try:
        start, end = parse_range(text)
    except ValueError:
        raise _bad(
            "a date parameter needs a FHIR date or dateTime (years 1 to 9999) with an optional prefix", param
        ) from None
    return {
        "eq": [("ge", start), ("lt", end)],
        "ge": [("ge", start)],
        "gt": [("ge", end)],
        "le": [("lt", end)],
        "lt": [("lt", start)],
    }[prefix]


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def parse_elements(value: str, param: str = "_elements") -> tuple[str, ...]:
    """The top-level element names of ``_elements`` (paths into elements are not supported)."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names or len(names) > MAX_ELEMENTS or not all(_ELEMENT_NAME.match(n) for n in names):
        raise _bad("_elements needs 1 to 50 top-level element names, comma-separated", param)
    return tuple(dict.fromkeys(names))


def patient_id_of(reference: str, fhir_base_url: str) -> str | None:
    """The Patient id a ``patient=`` value names: a bare id, ``Patient/id``, or an absolute
    reference under this server's base (http or https); None for anything else (another
    server's Patient, another type), which matches nothing here."""
    text = reference.split("/_history/")[0]
    if "://" in text:
        _, _, here = fhir_base_url.partition("://")
        _, _, there = text.partition("://")
        prefix = here.rstrip("/") + "/"
        if not (text.startswith(("http://", "https://")) and there.startswith(prefix)):
            return None
        text = there.removeprefix(prefix)
    kind, slash, rid = text.rpartition("/")
    if not slash:
        return text or None
    return rid if kind == "Patient" and rid else None


def _is_number(value: str) -> bool:
    # ASCII digits only: str.isdigit() admits "²" and other digits that int() refuses.
    return value.isascii() and value.isdigit() and len(value) <= 9


def parse_search(
    resource_type: str,
    params: Sequence[tuple[str, str]],
    indexer: BlindIndexer | Sequence[BlindIndexer],
    *,
    lenient: bool,
    fhir_base_url: str = "",
) -> ParsedSearch:
    # Every index key in use (a rotation's two): a row is under one of them, a query under all.
    indexers = (indexer,) if isinstance(indexer, BlindIndexer) else tuple(indexer)
    allowed = SEARCH_PARAMETERS.get(resource_type)
    if allowed is None:
        raise NotFound(f"{resource_type} is not searchable here", code="not-supported")
    flt = SearchFilter(resource_type=resource_type)
    count, offset, newest_first = DEFAULT_COUNT, 0, True
    cursor: str | None = None
    count_total = True
    echo: list[tuple[str, str]] = []
    value_concepts: list[list[tuple[str, str]]] = []
    hidden: list[tuple[str, list[bytes]]] = []
    identifiers = 0
    summary_count = False
    elements: tuple[str, ...] | None = None
    for name, value in params:
        if _CONTROL.search(name) or _CONTROL.search(value):
            # PostgreSQL refuses NUL in text parameters; no search term holds control characters.
            raise _bad("search parameters must not hold control characters", "")
        base, _, modifier = name.partition(":")
        if name in GENERAL_PARAMETERS:
            continue
        if base in CONTROL_PARAMETERS:
            if base == "_count":
                if not _is_number(value) or not 0 <= int(value) <= MAX_COUNT:
                    raise _bad(f"_count must be 0 to {MAX_COUNT}", name)
                count = int(value)
            elif base == "_offset":
                if not _is_number(value) or int(value) > MAX_OFFSET:
                    raise _bad(f"_offset must be 0 to {MAX_OFFSET}", name)
                offset = int(value)
            elif base == "_cursor":
                cursor = value
            elif base == "_totalMethod":
                if value not in ("count", "estimate", "none"):
                    raise _bad("_totalMethod must be count, estimate or none", name)
                count_total = value != "none"
            elif base == "_total":
                if value not in ("none", "estimate", "accurate"):
                    raise _bad("_total must be none, estimate or accurate", name)
                count_total = value != "none"  # an estimate is answered with the exact count
                echo.append((name, value))
            elif base == "_summary":
                if value not in ("count", "false"):
                    raise _bad("_summary supports count and false", name, "not-supported")
                summary_count = value == "count"
                echo.append((name, value))
            elif base == "_elements":
                elements = parse_elements(value, name)
                echo.append((name, ",".join(elements)))
            elif value in ("_lastUpdated", "-_lastUpdated"):
                newest_first = value.startswith("-")
                echo.append((name, value))
            else:
                raise _bad("_sort supports _lastUpdated and -_lastUpdated", name, "not-supported")
            continue
        if base not in allowed or modifier:
            if lenient:
                continue
            raise _bad("unknown or unsupported search parameter", name, "not-supported")
        echo.append((name, value))
        if base == "patient":
            named = [patient_id_of(v, fhir_base_url) for v in _split(value, name)]
            ids = [i for i in named if i is not None]
            flt.subject_ids = ids if flt.subject_ids is None else [i for i in flt.subject_ids if i in ids]
        elif base == "_id":
            ids = _split(value, name)
            flt.ids = ids if flt.ids is None else [i for i in flt.ids if i in ids]
        elif base == "identifier":
            hashes = []
            given = 0
            for item in _split(value, name):
                system, bar, ident = item.partition("|")
                if not bar or not system or not ident:
                    raise _bad("identifier search needs system|value", name)
                try:
                    hashes += [one.identifier(system, ident) for one in indexers]
                except ValueError:
                    raise _bad("identifier search needs system|value", name) from None
                given += 1
            flt.token_groups.append(("identifier", hashes))
            hidden.append(("identifier", hashes))
            identifiers += given
            if identifiers > MAX_VALUES:
                raise _bad(f"a search names at most {MAX_VALUES} identifiers", name)
        elif base == "value-concept":
            value_concepts.append(_tokens(value, name))
        elif base in _TOKEN_PARAMS:
            tokens = [
                code_token(one, system, code) for system, code in _tokens(value, name) for one in indexers
            ]
            flt.token_groups.append(("code", tokens))
        elif base in ("date", "_lastUpdated"):
            target = flt.date_ranges if base == "date" else flt.updated_ranges
            for op, bound in _date_bounds(name, value):
                target.append((op, bound))
    if cursor is not None and (offset or value_concepts):
        raise _bad(
            "_cursor pages by position: it cannot be combined with _offset or value-concept", "_cursor"
        )
    if cursor is not None and hidden:
        raise _bad("a _cursor carries its search's identifiers: follow the next link as given", "_cursor")
    if value_concepts and hidden:
        # A value-concept search pages by _offset in its links, which cannot carry the
        # identifiers hidden from them (and an identifier names one record: no paging needed).
        raise _bad("identifier and value-concept cannot be combined in one search", "identifier")
    return ParsedSearch(
        flt,
        count,
        offset,
        newest_first,
        echo,
        cursor=cursor,
        count_total=count_total,
        value_concepts=value_concepts,
        hidden=hidden,
        summary_count=summary_count,
        elements=elements,
    )

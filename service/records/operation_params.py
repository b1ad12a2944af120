"""Parameters of history and Patient/$everything: page size, ``_since``, ``_at``, ``_type``, cursor.

Like search, an unknown parameter is refused (unless the client asked for lenient
handling) rather than silently ignored: a client that meant to filter must not
receive everything believing it filtered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from service.domain.errors import Invalid
from service.records.fhir_dates import parse_range
from service.records.resource_types import STORED_TYPES
from service.records.search_params import DEFAULT_COUNT, GENERAL_PARAMETERS, MAX_COUNT, parse_elements

MAX_EVERYTHING_COUNT = 1000


def _bad(diagnostics: str, param: str, code: str = "invalid") -> Invalid:
    return Invalid(diagnostics, expression=param, code=code)


@dataclass
class PageParameters:
    """What a history or $everything request asked for, checked."""

    count: int = DEFAULT_COUNT
    since: datetime | None = None
    at: tuple[datetime, datetime] | None = None  # [start, end) the versions must overlap
    types: list[str] | None = None  # $everything's _type, in the order given
    cursor: str | None = None
    summary_count: bool = False  # _summary=count: the total only
    elements: tuple[str, ...] | None = None
    echo: list[tuple[str, str]] = field(default_factory=list)  # for self and next links

    @property
    def total_only(self) -> bool:
        return self.summary_count or self.count == 0


def _instant(value: str, name: str) -> datetime:
    try:
        return parse_range(value)[0]
    except ValueError:
        raise _bad(f"{name} needs a FHIR instant (or date/dateTime)", name) from None


def parse_page_parameters(
    params: Sequence[tuple[str, str]],
    *,
    allowed: frozenset[str],
    max_count: int = MAX_COUNT,
    default_count: int = DEFAULT_COUNT,
    lenient: bool,
) -> PageParameters:
    """``allowed``: the parameters this interaction takes, of _count, _since, _at, _type,
    _cursor, _summary and _elements (_format and _pretty are always accepted)."""
    parsed = PageParameters(count=default_count)
    for name, value in params:
        if name in GENERAL_PARAMETERS:
            continue
        if name not in allowed:
            if lenient:
                continue
            raise _bad("unknown or unsupported parameter", name, "not-supported")
        if name == "_count":
            if not (value.isascii() and value.isdigit() and len(value) <= 9) or int(value) > max_count:
                raise _bad(f"_count must be 0 to {max_count}", name)
            parsed.count = int(value)
            continue  # the links write the page size themselves
        elif name == "_since":
            parsed.since = _instant(value, name)
        elif name == "_at":
            try:
                parsed.at = parse_range(value)
            except ValueError:
                raise _bad("_at needs a FHIR date, dateTime or instant", name) from None
        elif name == "_type":
            types = [t for t in value.split(",") if t]
            if not types or any(t not in STORED_TYPES for t in types):
                raise _bad("_type needs resource types this server stores", name, "not-supported")
            parsed.types = types if parsed.types is None else [t for t in parsed.types if t in types]
        elif name == "_summary":
            if value not in ("count", "false"):
                raise _bad("_summary supports count and false", name, "not-supported")
            parsed.summary_count = value == "count"
        elif name == "_elements":
            parsed.elements = parse_elements(value, name)
        elif name == "_cursor":
            parsed.cursor = value
            continue  # a next link's position, not part of what was asked
        parsed.echo.append((name, value))
    return parsed

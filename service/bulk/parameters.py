"""The kick-off request of ``$export``, checked (Bulk Data Access IG 3.0.0, "Bulk Data Kick-off").

- ``Prefer: respond-async`` is required: without it the kick-off is a 400 (the IG's export is
  asynchronous only).
- ``_outputFormat``: ``application/fhir+ndjson``, or its abbreviations ``application/ndjson``
  and ``ndjson``; anything else is a 400.
- ``_type``: comma-separated and repeatable; an unknown or unexported type is a 400.
- ``_since`` and ``_until``: FHIR instants; resources whose current version was written after
  ``_since`` and at or before ``_until`` (which defaults to the kick-off time, the manifest's
  ``transactionTime``, so that the output is a consistent cut whatever is written while it runs).
- Parameters of the IG this service does not support (``_elements``, ``patient``,
  ``includeAssociatedData``, ``_typeFilter``, ``organizeOutputBy``, ``allowPartialManifests``)
  and unknown ones are a 400, unless the request says ``Prefer: handling=lenient``, when they
  are ignored (the IG lets a server ignore them only then; ``handling=strict`` keeps the error).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from service.domain.errors import Invalid
from service.records.fhir_dates import parse_range
from service.records.resource_types import STORED_TYPES

OUTPUT_FORMATS = frozenset({"application/fhir+ndjson", "application/ndjson", "ndjson"})
NDJSON = "application/fhir+ndjson"
SUPPORTED = frozenset({"_outputFormat", "_type", "_since", "_until"})
# Parameters the IG defines that this service does not implement.
UNSUPPORTED = frozenset(
    {
        "_elements",
        "patient",
        "includeAssociatedData",
        "_typeFilter",
        "organizeOutputBy",
        "allowPartialManifests",
    }
)
EXPORTED_TYPES = tuple(sorted(STORED_TYPES))


@dataclass(frozen=True)
class ExportParameters:
    types: tuple[str, ...]
    since: datetime | None
    until: datetime | None


def _bad(diagnostics: str, expression: str | None = None, code: str = "invalid") -> Invalid:
    return Invalid(diagnostics, expression=expression, code=code)


def _preferences(prefer_headers: Sequence[str]) -> set[str]:
    return {
        token.strip().replace(" ", "").lower()
        for header in prefer_headers
        for token in header.split(",")
        if token.strip()
    }


def check_prefer(prefer_headers: Sequence[str]) -> bool:
    """Require ``respond-async``; return whether unsupported parameters are to be ignored."""
    preferences = _preferences(prefer_headers)
    if "respond-async" not in preferences:
        raise _bad("a Bulk Data kick-off needs the header 'Prefer: respond-async'", code="required")
    return "handling=lenient" in preferences


def _instant(value: str, name: str) -> datetime:
    try:
        start, _ = parse_range(value)
    except ValueError:
        raise _bad(f"{name} needs a FHIR instant", name) from None
    return start


def parse_export_parameters(params: Sequence[tuple[str, str]], *, lenient: bool) -> ExportParameters:
    """The checked parameters; a 400 OperationOutcome for anything wrong (see the module)."""
    types: list[str] = []
    since: datetime | None = None
    until: datetime | None = None
    seen: set[str] = set()
    for name, value in params:
        if name not in SUPPORTED:
            if lenient:
                continue
            what = "is not supported by this server" if name in UNSUPPORTED else "is not a kick-off parameter"
            raise _bad(
                f"{name[:40]} {what} (send 'Prefer: handling=lenient' to have it ignored)",
                name[:40],
                code="not-supported",
            )
        if name in ("_since", "_until", "_outputFormat") and name in seen:
            raise _bad(f"{name} is given more than once", name)
        seen.add(name)
        if name == "_outputFormat":
            if value not in OUTPUT_FORMATS:
                raise _bad("_outputFormat must be application/fhir+ndjson", name, code="not-supported")
        elif name == "_type":
            for item in (t.strip() for t in value.split(",")):
                if item not in STORED_TYPES:
                    raise _bad(
                        "_type names a resource type this server does not export", name, code="not-supported"
                    )
                if item not in types:
                    types.append(item)
        elif name == "_since":
            since = _instant(value, name)
        else:
            until = _instant(value, name)
    if since is not None and until is not None and until <= since:
        raise _bad("_until must be later than _since", "_until")
    return ExportParameters(tuple(types) or EXPORTED_TYPES, since, until)

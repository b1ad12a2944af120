"""``_elements``: a resource cut down to the top-level elements asked for, marked SUBSETTED.

Only a request that asks pays for parsing and re-serialising: every other read
answers the stored bytes as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
    "display": "subsetted",
}
# Always kept (FHIR R4 search.html, _elements): what makes it a resource one can follow.
_ALWAYS = ("resourceType", "id", "meta")


def only_elements(body: bytes, elements: Sequence[str] | None) -> bytes:
    """``body`` with only ``elements`` (plus resourceType, id, meta) and the SUBSETTED tag;
    unchanged when no ``_elements`` was asked for."""
    if elements is None:
        return body
    resource: dict[str, Any] = orjson.loads(body)
    kept = {k: v for k, v in resource.items() if k in _ALWAYS or k in elements}
    meta = dict(kept.get("meta") or {})
    tags = [t for t in meta.get("tag", []) if t.get("code") != "SUBSETTED"]
    meta["tag"] = [*tags, SUBSETTED]
    kept["meta"] = meta
    return orjson.dumps(kept)

"""FHIR JSON responses and searchset Bundles with absolute paging links."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import orjson
from starlette.responses import Response

from service.http.errors import FHIR_JSON


class FhirResponse(Response):
    media_type = FHIR_JSON

    def render(self, content: Any) -> bytes:
        if isinstance(content, bytes):
            return content
        return orjson.dumps(content)


def search_url(base: str, resource_type: str, params: Sequence[tuple[str, str]]) -> str:
    query = urlencode(list(params))
    return f"{base}/{resource_type}" + (f"?{query}" if query else "")


def searchset(
    entries: Sequence[Mapping[str, Any]],
    *,
    total: int | None,
    self_url: str,
    next_url: str | None = None,
) -> dict[str, Any]:
    links = [{"relation": "self", "url": self_url}]
    if next_url:
        links.append({"relation": "next", "url": next_url})
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "timestamp": datetime.now(UTC).isoformat(),
        "link": links,
    }
    if entries:  # FHIR JSON has no empty arrays
        bundle["entry"] = list(entries)
    if total is not None:
        bundle["total"] = total
    return bundle

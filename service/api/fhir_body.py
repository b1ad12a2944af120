"""Reading a FHIR JSON request body: media type, size (already bounded by the ASGI layer), JSON."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request

from service.errors import FhirError

ACCEPTED_TYPES = frozenset({"application/fhir+json", "application/json", "application/json+fhir"})
MAX_DEPTH = 64


def _depth_ok(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return True


async def read_fhir_json(request: Request) -> Any:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in ACCEPTED_TYPES:
        raise FhirError.single(415, "not-supported", "send application/fhir+json")
    body = await request.body()
    if not body.strip():
        raise FhirError.single(400, "structure", "the request body is empty")
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        # No position or excerpt: the body can be PHI.
        raise FhirError.single(400, "structure", "the request body is not valid JSON (UTF-8)") from None
    if not _depth_ok(parsed, MAX_DEPTH):
        raise FhirError.single(400, "structure", f"JSON nested deeper than {MAX_DEPTH} levels")
    return parsed

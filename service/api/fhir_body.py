"""Reading a FHIR JSON request body: media type, size (already bounded by the ASGI layer), JSON."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson
from fastapi import Request

from service.errors import FhirError

ACCEPTED_TYPES = frozenset({"application/fhir+json", "application/json", "application/json+fhir"})
MAX_DEPTH = 64
# FHIR strings: at most 1 MiB of characters, and no control characters but tab, CR and LF
# (they cannot be carried in FHIR XML, and NUL truncates strings in C-based consumers).
MAX_STRING = 1024 * 1024
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _shape_problem(value: Any, limit: int) -> str | None:
    """Why the parsed body cannot be FHIR, judged on its shape alone; None if it may be."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return f"JSON nested deeper than {limit} levels"
        if isinstance(node, dict):
            for key, item in node.items():
                if _CONTROL.search(key):
                    return "a JSON key holds a control character"
                stack.append((item, depth + 1))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
        elif isinstance(node, str):
            if len(node) > MAX_STRING:
                return f"a string is longer than {MAX_STRING} characters"
            if _CONTROL.search(node):
                return "a string holds a control character (only tab, CR and LF are allowed)"
    return None


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKey
    return obj


def _has_duplicate_keys(body: bytes) -> bool:
    """Whether any JSON object repeats a key. orjson keeps the last silently, and another parser
    may keep the first: a body that means two things to two readers is refused."""
    try:
        json.loads(body, object_pairs_hook=_no_duplicates)
    except _DuplicateKey:
        return True
    return False


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
    problem = _shape_problem(parsed, MAX_DEPTH)
    if problem is not None:  # fixed texts: never a value from the body
        raise FhirError.single(400, "structure", problem)
    if _has_duplicate_keys(body):
        raise FhirError.single(400, "structure", "a JSON object in the request body repeats a key")
    return parsed

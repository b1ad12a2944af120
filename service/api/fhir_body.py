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


# In JSON text a control character can only be written as an escape (\uXXXX, \b, \f;
# raw ones are refused by the parser), except DEL, which may stand as itself. A body
# with none of these cannot hold one, and the per-string search is skipped.
_CONTROL_SPELLINGS = (b"\\u", b"\\b", b"\\f", b"\x7f")


def _depth_problem(value: Any, limit: int) -> str | None:
    """``_shape_problem`` for a body known to hold no control character and no long string."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit or (node and depth == limit):  # a member or item one level deeper
            return f"JSON nested deeper than {limit} levels"
        for item in node.values() if isinstance(node, dict) else node:
            if isinstance(item, (dict, list)):
                stack.append((item, depth + 1))
    return None


def _body_problem(body: bytes, value: Any) -> str | None:
    if not isinstance(value, (dict, list)):
        return _shape_problem(value, MAX_DEPTH)
    if len(body) <= MAX_STRING and not any(s in body for s in _CONTROL_SPELLINGS):
        # A string has at most as many characters as the body has bytes.
        return _depth_problem(value, MAX_DEPTH)
    return _shape_problem(value, MAX_DEPTH)


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> None:
    # The parsed value is thrown away (orjson's is kept), so no dict is built.
    if len(pairs) > 1 and len({key for key, _ in pairs}) != len(pairs):
        raise _DuplicateKey


_PAIRS_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates)


def _has_duplicate_keys(body: bytes) -> bool:
    """Whether any JSON object repeats a key. orjson keeps the last silently, and another parser
    may keep the first: a body that means two things to two readers is refused."""
    try:
        _PAIRS_DECODER.decode(body.decode(json.detect_encoding(body), "surrogatepass"))  # as json.loads
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
    problem = _body_problem(body, parsed)
    if problem is not None:  # fixed texts: never a value from the body
        raise FhirError.single(400, "structure", problem)
    if _has_duplicate_keys(body):
        raise FhirError.single(400, "structure", "a JSON object in the request body repeats a key")
    return parsed

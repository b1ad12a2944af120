"""Reading a FHIR JSON request body: media type, size (already bounded by the ASGI layer), work, JSON.

The work a body can cost is bounded before the expensive steps: its number of values
before it is parsed (``service.api.json_size``), its depth, array lengths, string
lengths and Bundle entries in one pass over the parsed value, before fhir.resources
validates it. Parsing and these checks run on a worker thread (``service.core.offload``),
never on the event loop.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson
from fastapi import Request

from service.api.json_size import holds_more_values_than
from service.core.settings import Settings
from service.http.errors import FhirError

ACCEPTED_TYPES = frozenset({"application/fhir+json", "application/json", "application/json+fhir"})
# FHIR strings hold no control characters but tab, CR and LF (they cannot be carried in
# FHIR XML, and NUL truncates strings in C-based consumers).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class BodyLimits:
    """The most work one request body may ask for (settings ``MHR_MAX_JSON_*``, README "Limits")."""

    values: int = 100_000
    array_items: int = 10_000
    depth: int = 64
    string_chars: int = 1024 * 1024
    bundle_entries: int = 500

    @classmethod
    def from_settings(cls, settings: Settings) -> BodyLimits:
        return cls(
            values=settings.max_json_values,
            array_items=settings.max_json_array_items,
            depth=settings.max_json_depth,
            string_chars=settings.max_json_string_chars,
            bundle_entries=settings.max_bundle_entries,
        )


class Refusal(NamedTuple):
    """Why a body is refused: fixed texts that name the limit, never a value from the body."""

    status: int
    code: str
    text: str
    expression: str | None = None

    def error(self) -> FhirError:
        return FhirError.single(self.status, self.code, self.text, expression=self.expression)


def _too_costly(text: str, expression: str | None = None) -> Refusal:
    return Refusal(413, "too-costly", f"{text}, the limit of this server", expression)


def _too_deep(limits: BodyLimits) -> Refusal:
    return _too_costly(f"the request body nests JSON deeper than {limits.depth} levels")


def _too_many_values(limits: BodyLimits) -> Refusal:
    return _too_costly(f"the request body holds more than {limits.values} JSON values: split the submission")


def _too_many_items(limits: BodyLimits) -> Refusal:
    return _too_costly(f"a JSON array in the request body holds more than {limits.array_items} items")


def _too_long(limits: BodyLimits) -> Refusal:
    return _too_costly(f"a string in the request body is longer than {limits.string_chars} characters")


def _shape_problem(value: Any, limits: BodyLimits) -> Refusal | None:
    """Why the parsed body cannot be accepted, judged on its shape alone; None if it may be."""
    stack = [(value, 1)]
    values = 1
    while stack:
        node, depth = stack.pop()
        if depth > limits.depth:
            return _too_deep(limits)
        if isinstance(node, dict):
            values += len(node)
            for key, item in node.items():
                if _CONTROL.search(key):
                    return Refusal(400, "structure", "a JSON key holds a control character")
                stack.append((item, depth + 1))
        elif isinstance(node, list):
            if len(node) > limits.array_items:
                return _too_many_items(limits)
            values += len(node)
            stack.extend((v, depth + 1) for v in node)
        elif isinstance(node, str):
            if len(node) > limits.string_chars:
                return _too_long(limits)
            if _CONTROL.search(node):
                return Refusal(
                    400, "structure", "a string holds a control character (only tab, CR and LF are allowed)"
                )
        if values > limits.values:  # counted before parsing too: this is the second line
            return _too_many_values(limits)
    return None


# In JSON text a control character can only be written as an escape (\uXXXX, \b, \f;
# raw ones are refused by the parser), except DEL, which may stand as itself. A body
# with none of these cannot hold one, and the per-string search is skipped.
_CONTROL_SPELLINGS = (b"\\u", b"\\b", b"\\f", b"\x7f")


def _container_problem(value: Any, limits: BodyLimits) -> Refusal | None:
    """``_shape_problem`` for a body known to hold no control character and no long string."""
    stack = [(value, 1)]
    values = 1
    while stack:
        node, depth = stack.pop()
        if depth > limits.depth or (node and depth == limits.depth):  # a member or item one level deeper
            return _too_deep(limits)
        if type(node) is list and len(node) > limits.array_items:
            return _too_many_items(limits)
        values += len(node)
        if values > limits.values:
            return _too_many_values(limits)
        for item in node.values() if isinstance(node, dict) else node:
            if isinstance(item, (dict, list)):
                stack.append((item, depth + 1))
    return None


def _body_problem(body: bytes, value: Any, limits: BodyLimits) -> Refusal | None:
    if isinstance(value, dict) and value.get("resourceType") == "Bundle":
        entries = value.get("entry")
        if isinstance(entries, list) and len(entries) > limits.bundle_entries:
            return _too_costly(f"a Bundle holds more than {limits.bundle_entries} entries", "Bundle.entry")
    if not isinstance(value, (dict, list)):
        return _shape_problem(value, limits)
    if len(body) <= limits.string_chars and not any(s in body for s in _CONTROL_SPELLINGS):
        # A string has at most as many characters as the body has bytes.
        return _container_problem(value, limits)
    return _shape_problem(value, limits)


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


def parse_fhir_json(body: bytes, limits: BodyLimits) -> Any:
    """The parsed body, or the FhirError that refuses it. CPU-bound: call it off the event loop."""
    if holds_more_values_than(body, limits.values):
        raise _too_many_values(limits).error()
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("depth limit exceeded"):  # orjson's own limit, past ours
            raise _too_deep(limits).error() from None
        # No position or excerpt: the body can be PHI.
        raise FhirError.single(400, "structure", "the request body is not valid JSON (UTF-8)") from None
    problem = _body_problem(body, parsed, limits)
    if problem is not None:
        raise problem.error()
    if _has_duplicate_keys(body):
        raise FhirError.single(400, "structure", "a JSON object in the request body repeats a key")
    return parsed


async def read_fhir_json(request: Request) -> Any:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in ACCEPTED_TYPES:
        raise FhirError.single(415, "not-supported", "send application/fhir+json")
    body = await request.body()
    if not body.strip():
        raise FhirError.single(400, "structure", "the request body is empty")
    runtime = request.app.state.runtime
    limits = BodyLimits.from_settings(runtime.settings)
    return await runtime.records.offload.run(lambda: parse_fhir_json(body, limits))

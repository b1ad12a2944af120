"""The wire format of every ``/fhir`` response: JSON only, ``_format`` and ``Accept`` honoured.

FHIR lets a client ask for a format with ``_format`` or ``Accept`` (R4 http.html#mime-type).
This server speaks JSON: a request for XML (or any format it cannot give) is answered
``406`` with an OperationOutcome rather than with JSON the client did not ask for.
``_pretty=true`` re-indents the JSON; only a request that asks pays for it, every other
answer goes out as the stored bytes.

A plain ASGI middleware, so that every FHIR route (and every error) is covered once.
"""

from __future__ import annotations

import contextlib
from urllib.parse import parse_qsl

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.http.errors import OutcomeIssue, outcome_response

JSON_FORMATS = frozenset({"json", "application/json", "application/fhir+json", "application/json+fhir"})
# AuditEvent search streams NDJSON when asked (its route decides).
NDJSON_FORMATS = frozenset({"ndjson", "application/ndjson", "application/fhir+ndjson"})
_ANY = frozenset({"*/*", "application/*"})
IMAGE_OPERATIONS = ("/$chart",)


def _media(value: str) -> str:
    # An unescaped "+" in a query string reads as a space: "_format=application/fhir+json".
    return value.split(";")[0].strip().lower().replace(" ", "+")


def format_acceptable(fmt: str) -> bool:
    return _media(fmt) in JSON_FORMATS | NDJSON_FORMATS


def accept_acceptable(accept: str) -> bool:
    """Does an ``Accept`` header admit JSON (or NDJSON, or plain text for the log's notes)?"""
    for media_range in accept.split(","):
        media, *params = (p.strip() for p in media_range.split(";"))
        media = media.lower()
        if any(p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in params):
            continue
        if not media or media in _ANY or (media.endswith("json") and "xml" not in media):
            return True
        if media.startswith("text/") and "xml" not in media and media != "text/turtle":
            return True
    return False


class FhirFormats:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        # An operation answering an image (Measure/$chart) negotiates its own format.
        if scope["type"] != "http" or not path.startswith("/fhir") or path.endswith(IMAGE_OPERATIONS):
            await self.app(scope, receive, send)
            return
        raw = bytes(scope.get("query_string", b""))
        # Most requests name neither: their query string is not parsed a second time here.
        asked = b"_format" in raw or b"_pretty" in raw
        query = parse_qsl(raw.decode("latin-1"), keep_blank_values=True) if asked else []
        # An empty _format names no format: the default (JSON) answers, as if it were absent.
        formats = [v for k, v in query if k == "_format" and v.strip()]
        accept = next((bytes(v).decode("latin-1") for k, v in scope.get("headers", ()) if k == b"accept"), "")
        if (formats and not all(format_acceptable(f) for f in formats)) or (
            not formats and accept.strip() and not accept_acceptable(accept)
        ):
            refusal = outcome_response(
                406,
                [OutcomeIssue("not-supported", "this server answers FHIR JSON only (application/fhir+json)")],
            )
            await refusal(scope, receive, send)
            return
        if any(k == "_pretty" and v == "true" for k, v in query):
            await self.app(scope, receive, _pretty_printing(send))
            return
        await self.app(scope, receive, send)


def _pretty_printing(send: Send) -> Send:
    """A ``send`` that re-indents a JSON response body (buffered: FHIR JSON is one document)."""
    start: Message | None = None
    chunks: list[bytes] = []

    async def wrapped(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            content_type = dict(message.get("headers", ())).get(b"content-type", b"")
            if b"json" in content_type and b"ndjson" not in content_type:
                start = message
                return
        elif message["type"] == "http.response.body" and start is not None:
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            with contextlib.suppress(orjson.JSONDecodeError):  # not JSON after all: sent as it is
                body = orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2) if body else body
            headers = [(k, v) for k, v in start.get("headers", ()) if k != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await send(message)

    return wrapped

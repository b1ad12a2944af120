"""``Prefer: return=...`` on create, update and transaction (FHIR R4 http.html#ops).

One place decides what a write answers: the resource as stored (``representation``),
nothing (``minimal``) or an OperationOutcome saying what was done
(``OperationOutcome``). The status and headers (Location, ETag, Last-Modified) are
the same whatever the body.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from enum import Enum

import orjson
from fastapi import Request
from starlette.responses import Response

from service.http.errors import FHIR_JSON, OutcomeIssue, operation_outcome


class Return(Enum):
    minimal = "minimal"
    representation = "representation"
    outcome = "OperationOutcome"


def return_preference(request: Request, default: Return) -> Return:
    """The client's ``return=`` preference; ``default`` when it states none (or one unknown:
    a preference is a request the server may decline, never an error)."""
    for header in request.headers.getlist("prefer"):
        for token in header.split(","):
            name, _, value = token.strip().partition("=")
            if name.strip() == "return":
                try:
                    return Return(value.strip().strip('"'))
                except ValueError:
                    return default
    return default


def http_date(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")


def outcome_of_write(what: str) -> bytes:
    """The OperationOutcome that ``return=OperationOutcome`` asks for: what was done, no content."""
    return orjson.dumps(operation_outcome([OutcomeIssue("informational", what, severity="information")]))


def written_response(
    preference: Return,
    body: bytes,
    *,
    status: int,
    what: str,
    headers: Mapping[str, str],
) -> Response:
    """A create's or update's answer in the form the client preferred."""
    if preference is Return.minimal:
        return Response(status_code=status, headers=dict(headers))
    content = outcome_of_write(what) if preference is Return.outcome else body
    return Response(content, status_code=status, media_type=FHIR_JSON, headers=dict(headers))

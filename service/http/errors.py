"""Every error the FHIR API returns is an OperationOutcome made here.

Use-cases raise domain errors (``service.domain.errors``: NotFound, Gone,
Conflict, ...) and know nothing of HTTP; ``DOMAIN_OUTCOMES`` below is the one
place that gives each kind its status and issue code. HTTP plumbing raises
``FhirError`` directly. The handlers below turn both, Starlette's routing
errors and FastAPI's validation errors into an OperationOutcome with the
matching status. A 500 says only its correlation id:
exception text can carry PHI or internals.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass, field
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import orjson
import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Match

from service.core.request_context import current_request_id
from service.domain import errors as domain

log = logging.getLogger(__name__)

# Every FHIR response says its charset (FHIR R4 http.html: "application/fhir+json; charset=utf-8").
FHIR_JSON = "application/fhir+json; charset=utf-8"


@dataclass(frozen=True)
class OutcomeIssue:
    code: str
    diagnostics: str
    severity: str = "error"
    expression: str | None = None

    def as_fhir(self) -> dict[str, Any]:
        issue: dict[str, Any] = {
            "severity": self.severity,
            "code": self.code,
            "diagnostics": self.diagnostics,
        }
        if self.expression:
            issue["expression"] = [self.expression]
        return issue


@dataclass
class FhirError(Exception):
    status: int
    issues: list[OutcomeIssue]
    headers: dict[str, str] = field(default_factory=dict)
    # A refusal that must be on the audit record: written in its own transaction
    # by the session dependency, after the request's transaction rolled back.
    audit: Any = None

    @classmethod
    def single(
        cls,
        status: int,
        code: str,
        diagnostics: str,
        *,
        expression: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> FhirError:
        return cls(status, [OutcomeIssue(code, diagnostics, expression=expression)], headers or {})

    def __str__(self) -> str:
        return f"{self.status}: " + "; ".join(i.diagnostics for i in self.issues)


class BodyTooLarge(StarletteHTTPException):
    """The request body grew past the configured limit while streaming in.

    An HTTPException, so that FastAPI's body parsing re-raises it (any other
    exception there becomes a 400) and the 413 handler below answers it.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


class BodyTimeout(StarletteHTTPException):
    """The client did not send its whole request body within the configured time (a slow client)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"the request body was not received within {seconds:g} seconds")


# How long a client should wait before retrying while the database is unreachable.
DATABASE_RETRY_AFTER_SECONDS = 5

# Exceptions that mean "the database cannot be reached right now", wherever they are raised:
# asyncpg raises OSError subclasses (ConnectionRefusedError, TimeoutError) from connect, which
# SQLAlchemy does not wrap; a connection lost mid-query arrives as a DBAPIError.
_UNAVAILABLE_TYPES: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    sqlalchemy.exc.TimeoutError,  # the pool is exhausted
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,
    sqlite3.OperationalError,  # "database is locked"
)
DATABASE_ERROR_TYPES: tuple[type[Exception], ...] = (
    sqlalchemy.exc.DBAPIError,
    sqlalchemy.exc.TimeoutError,
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


def database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the database is unreachable: a 503, not a 500."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sqlalchemy.exc.DBAPIError) and (
            current.connection_invalidated
            or isinstance(current, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError)
        ):
            return True
        if isinstance(current, _UNAVAILABLE_TYPES):
            return True
        if isinstance(current, sqlalchemy.exc.DBAPIError):
            current = current.orig
            continue
        current = current.__cause__ or current.__context__
    return False


def database_unavailable_response() -> Response:
    return outcome_response(
        503,
        [OutcomeIssue("transient", "the database is unavailable; retry later")],
        {"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)},
    )


# Each kind of domain error: its HTTP status and the FHIR issue type its problems default to.
DOMAIN_OUTCOMES: dict[type[domain.DomainError], tuple[int, str]] = {
    domain.Invalid: (400, "invalid"),
    domain.Forbidden: (403, "forbidden"),
    domain.NotFound: (404, "not-found"),
    domain.NotSupported: (405, "not-supported"),
    domain.Conflict: (409, "conflict"),
    domain.Gone: (410, "deleted"),
    domain.PreconditionFailed: (412, "conflict"),
    domain.TooCostly: (413, "too-costly"),
    domain.Unprocessable: (422, "processing"),
    domain.IntegrityFailure: (500, "exception"),
    domain.Unavailable: (503, "transient"),
}


def fhir_error(exc: domain.DomainError | FhirError) -> FhirError:
    """The FHIR answer to a refusal: a domain error mapped by its kind, a FhirError as it is."""
    if isinstance(exc, FhirError):
        return exc
    kind = next(k for k in type(exc).__mro__ if k in DOMAIN_OUTCOMES)
    status, default_code = DOMAIN_OUTCOMES[kind]
    issues = [
        OutcomeIssue(p.code or default_code, p.diagnostics, severity=p.severity, expression=p.expression)
        for p in exc.problems
    ]
    headers = {}
    if isinstance(exc, domain.NotSupported) and exc.allowed:
        headers["Allow"] = ", ".join(exc.allowed)
    return FhirError(status, issues, headers)


def not_found(resource_type: str) -> FhirError:
    # One message for "does not exist" and "exists but not yours": no existence oracle.
    return FhirError.single(404, "not-found", f"{resource_type} not found")


def operation_outcome(issues: list[OutcomeIssue]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [i.as_fhir() for i in issues]}


def outcome_response(
    status: int, issues: list[OutcomeIssue], headers: dict[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(operation_outcome(issues)),
        status_code=status,
        media_type=FHIR_JSON,
        headers=headers,
    )


_STATUS_CODES = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    409: "conflict",
    410: "deleted",
    408: "timeout",
    412: "conflict",
    413: "too-costly",
    415: "not-supported",
    422: "processing",
    429: "throttled",
    503: "transient",
}


def _validation_issues(exc: RequestValidationError) -> list[OutcomeIssue]:
    issues = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        # Pydantic's msg can quote the input; say only where and what kind.
        issues.append(
            OutcomeIssue(
                "invalid",
                f"invalid request {loc or 'input'}: {err.get('type', 'invalid')}",
                expression=loc or None,
            )
        )
    return issues


def _allowed_methods(request: Request) -> str:
    """Every method some route accepts at this path: the router stops at the first route
    whose path matches, so its own Allow header names only that route's methods."""
    probe = {**request.scope, "method": "\x00"}  # a method no route accepts: path matches are PARTIAL
    methods: set[str] = set()
    pending = list(request.app.router.routes)
    while pending:
        route = pending.pop()
        included = getattr(route, "original_router", None)  # FastAPI wraps included routers
        if included is not None:
            pending.extend(included.routes)
            continue
        match, _ = route.matches(probe)
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    # The DELETE route exists only to explain that exams are never deleted.
    return ", ".join(sorted(methods - {"DELETE"}))


def install_error_handlers(app: FastAPI) -> None:
    async def answer_fhir_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, FhirError)
        return outcome_response(exc.status, exc.issues, exc.headers)

    async def domain_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, domain.DomainError)
        mapped = fhir_error(exc)
        return outcome_response(mapped.status, mapped.issues, mapped.headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code
        text = {404: "no such endpoint", 405: "method not allowed"}.get(status, "request failed")
        if isinstance(exc, BodyTooLarge | BodyTimeout):
            text = exc.detail  # fixed text naming the configured limit, never request data
        headers = dict(exc.headers) if exc.headers else None
        if status == 405:
            headers = {**(headers or {}), "Allow": _allowed_methods(request)}
        return outcome_response(status, [OutcomeIssue(_STATUS_CODES.get(status, "exception"), text)], headers)

    async def validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return outcome_response(400, _validation_issues(exc))

    async def unexpected(_: Request, exc: Exception) -> Response:
        if database_unavailable(exc):
            # Logged without its message: a driver error can name hosts or quote statements.
            log.warning("database unavailable", extra={"error_type": type(exc).__name__})
            return database_unavailable_response()
        if isinstance(exc, ClientDisconnect):
            # The client went away mid-body: nothing to answer and nothing went wrong here.
            log.info("client disconnected before the request body was read")
            return outcome_response(400, [OutcomeIssue("incomplete", "the request body was not received")])
        request_id = current_request_id()
        log.error("unhandled error", exc_info=exc, extra={"error_type": type(exc).__name__})
        return outcome_response(
            500,
            [OutcomeIssue("exception", f"internal error; correlation id {request_id}")],
            {"X-Request-Id": request_id},
        )

    app.add_exception_handler(FhirError, answer_fhir_error)
    app.add_exception_handler(domain.DomainError, domain_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    # Database errors are answered here (in the routing layer) rather than by the server-error
    # layer, which would re-raise them after answering; `unexpected` tells outage from bug.
    for error_type in DATABASE_ERROR_TYPES:
        app.add_exception_handler(error_type, unexpected)
    app.add_exception_handler(Exception, unexpected)

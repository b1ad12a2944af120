"""The refusal chokepoint: every refused request is on the audit record, once.

An ASGI layer outside everything else (so that it sees the refusals the request
layer makes itself: 408, 413, a control character in the path) watches the
response status. When the status is a refusal (4xx/5xx) and nothing this
request did is on the record, it writes the entry before the status leaves:

- an identified caller (an access token that verifies, of an active client)
  gets a full entry: the refusal's own one when the code that refused built it
  (a 404 with its consent decision, a 403), else a generic one naming the
  interaction, the route template and the status;
- an unidentified caller (no token, a bad one, a refused client assertion) and
  a throttled client are counted in `service.audit.tally`: one entry per
  address or client, route, status and minute, so that a flood cannot grow the
  log by one row a request. So are an identified client's refusals past
  ``FULL_ENTRIES_PER_SECOND`` a second, and 503s (the database is unreachable:
  the count is written once it is back).

Nothing is written for a success: those are audited where they happen.
"""

from __future__ import annotations

import ipaddress
import logging
from datetime import UTC, datetime

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from security.access_tokens import TokenInvalid
from service.audit import request_audit
from service.audit.events import Action, AuditAgent, AuditRecord, EventType, Outcome
from service.audit.request_audit import RequestAudit
from service.audit.tally import RefusalKey
from service.core.request_context import SOURCE, current_request_id
from service.http.ratelimit import Costs, RateLimiter
from service.runtime.providers import Runtime

log = logging.getLogger(__name__)

# Full refusal entries per identified client: beyond this rate they are counted instead.
FULL_ENTRIES_PER_SECOND = 20.0
FULL_ENTRIES_BURST = 200.0

_ACTIONS = {"GET": Action.read, "HEAD": Action.read, "POST": Action.create, "PUT": Action.update}


def source_address(scope: Scope) -> str | None:
    """The caller's address as audited: IPv4 whole, IPv6 cut to its /64 (one host, many addresses)."""
    client = scope.get("client")
    if not client:
        return None
    host = str(client[0])[:64]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def _route(scope: Scope) -> str:
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else "unmatched"


def _subtype(method: str, route: str) -> str:
    if route == "unmatched":
        return "unknown"
    searches_type = route.startswith("/fhir/") and route.count("/") == 2 and method in ("GET", "HEAD")
    if route.endswith("/_search") or searches_type:
        return "search-type"
    if "/_history/" in route:
        return "vread"
    if route.endswith("/_history"):
        return "history"
    if "$" in route:
        return "operation"
    if method == "POST":
        return "transaction" if route == "/fhir" else "create"
    if method in ("PUT", "PATCH"):
        return "update"
    if method == "DELETE":
        return "delete"
    return "read"


def _bearer(scope: Scope) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == b"authorization":
            scheme, _, token = bytes(value).decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class RefusalAuditMiddleware:
    def __init__(self, app: ASGIApp, fastapi_app: FastAPI) -> None:
        self.app = app
        self.fastapi_app = fastapi_app
        self.budget = RateLimiter(
            rate=FULL_ENTRIES_PER_SECOND, burst=FULL_ENTRIES_BURST, costs=Costs(1.0, 1.0, 1.0)
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state, token = request_audit.begin()
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] >= 400:
                    await self._record(scope, state, int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            if not started:  # the server answers 500 itself
                await self._record(scope, state, 500)
            raise
        finally:
            request_audit.end(token)

    async def _record(self, scope: Scope, state: RequestAudit, status: int) -> None:
        runtime: Runtime | None = getattr(self.fastapi_app.state, "runtime", None)
        if runtime is None or state.committed:
            return
        try:
            await self._write(runtime, scope, state, status)
        except Exception as exc:
            # A refusal took no effect: it stands even when its entry cannot be written.
            log.error(
                "audit entry for a refusal could not be written", extra={"error_type": type(exc).__name__}
            )

    async def _write(self, runtime: Runtime, scope: Scope, state: RequestAudit, status: int) -> None:
        method = str(scope.get("method", "GET"))
        route = _route(scope)
        if state.agent is None and not state.authenticated:
            await self._identify(runtime, scope, state)
        agent = state.agent
        # 503: the database is unreachable, so a full entry could only wait for it and fail; the
        # count is written once it is back.
        throttled = state.throttled or status in (429, 503)
        if (
            agent is not None
            and agent.client_id
            and not throttled
            and self.budget.charge(agent.client_id, 1.0) is None
        ):
            records = state.handed or [self._generic(state, agent, method, route, status)]
            await runtime.audit_writer.write(records, request_id=current_request_id(), source=SOURCE)
            return
        reason = state.reason or (state.handed[0].detail if state.handed and state.handed[0].detail else None)
        runtime.refusal_tally.add(
            RefusalKey(
                client_id=agent.client_id if agent is not None else None,
                address=None if agent is not None else source_address(scope),
                route=route,
                method=method,
                status=status,
                reason=(reason or f"status-{status}")[:120],
            )
        )

    async def _identify(self, runtime: Runtime, scope: Scope, state: RequestAudit) -> None:
        """A refusal made before authentication ran (no such route, 405, 413 ...): who sent it?"""
        token = _bearer(scope)
        if token is None:
            return
        try:
            claims = runtime.tokens.verify(token, now=datetime.now(UTC))
        except TokenInvalid:
            return
        if not await runtime.client_status.is_active(claims.client_id):
            return
        state.agent = AuditAgent(claims.client_id, claims.organization_id, claims.role, claims.person)
        state.purpose = claims.purpose

    def _generic(
        self, state: RequestAudit, agent: AuditAgent, method: str, route: str, status: int
    ) -> AuditRecord:
        return AuditRecord(
            event_type=EventType.rest,
            subtype=_subtype(method, route),
            action=_ACTIONS.get(method, Action.execute),
            outcome=Outcome.serious_failure if status >= 500 else Outcome.minor_failure,
            agent=agent,
            purpose=state.purpose,
            detail=f"{status}: {state.reason}" if state.reason else f"status-{status}",
            route=route,
        )

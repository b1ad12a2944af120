"""Request dependencies, declared once so that a route's signature reads as its contract."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from security.access_tokens import AccessClaims, TokenInvalid
from security.scopes import Scope, ScopeError, parse_scopes, scopes_allow
from service.audit import request_audit
from service.audit.events import Action, AuditAgent, AuditRecord, EventType, Outcome
from service.http.errors import FhirError
from service.http.ratelimit import RateLimiter
from service.runtime.providers import Runtime
from service.store.database import run_at_commit

log = logging.getLogger(__name__)


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def _session(runtime: RuntimeDep) -> AsyncIterator[AsyncSession]:
    # The request owns the transaction: commit when the route returns, before
    # the response is sent (scope="function"), roll back on any error.
    async with runtime.database.sessions() as session:
        try:
            async with session.begin():
                yield session
                await run_at_commit(session)
        except FhirError as exc:
            request_audit.transaction_ended(committed=False)
            if exc.audit is not None:
                request_audit.hand_over(exc.audit)
            raise
        except BaseException:
            request_audit.transaction_ended(committed=False)
            raise
        request_audit.transaction_ended(committed=True)
        _commit_fault(runtime)


_commits = itertools.count(1)


def _commit_fault(runtime: Runtime) -> None:
    """The test fault MHR_TEST_EXIT_AFTER_COMMITS: die between commit and answer, like a kill -9."""
    limit = runtime.settings.test_exit_after_commits
    if limit and runtime.settings.is_development and next(_commits) >= limit:
        log.warning("test fault: exiting after a committed request, before answering it")
        os._exit(70)


async def _read_session(runtime: RuntimeDep) -> AsyncIterator[AsyncSession]:
    # Reads write nothing but audit entries, and those go through the audit writer
    # (committed before the route returns): no transaction to hold open.
    async with runtime.database.reading() as session:
        try:
            yield session
        except FhirError as exc:
            if exc.audit is not None:
                request_audit.hand_over(exc.audit)
            raise


SessionDep = Annotated[AsyncSession, Depends(_session, scope="function")]
ReadSessionDep = Annotated[AsyncSession, Depends(_read_session, scope="function")]


@dataclass(frozen=True)
class Principal:
    claims: AccessClaims
    scopes: tuple[Scope, ...]

    @property
    def client_id(self) -> str:
        return self.claims.client_id

    @property
    def organization_id(self) -> str:
        return self.claims.organization_id

    @property
    def role(self) -> str:
        return self.claims.role

    def may(self, resource_type: str, permission: str) -> bool:
        return scopes_allow(list(self.scopes), resource_type, permission)


def _unauthorized(error: str | None, description: str) -> FhirError:
    challenge = 'Bearer realm="mhr"'
    if error:
        challenge += f', error="{error}", error_description="{description}"'
    return FhirError.single(401, "login", description, headers={"WWW-Authenticate": challenge})


# An identified caller refused at authentication (a disabled client): named by the method, as the
# refusal chokepoint names a refusal it did not see made (``refusal_audit._subtype``).
_DENIAL_BY_METHOD = {
    "GET": ("read", Action.read),
    "HEAD": ("read", Action.read),
    "POST": ("create", Action.create),
    "PUT": ("update", Action.update),
    "PATCH": ("update", Action.update),
    "DELETE": ("delete", Action.delete),
}


def _audit_denial(request: Request, exc: FhirError, claims: AccessClaims | None) -> None:
    """A 401/403/429 for the refusal chokepoint (`service.api.refusal_audit`) to put on the record:
    a full entry for an identified caller, a count for an unidentified or throttled one."""
    request_audit.refusal_reason(exc.issues[0].diagnostics[:120], throttled=exc.status == 429)
    if claims is None or exc.status == 429:
        return
    subtype, action = _DENIAL_BY_METHOD.get(request.method, ("read", Action.read))
    route = getattr(request.scope.get("route"), "path", None)
    request_audit.hand_over(
        AuditRecord(
            event_type=EventType.rest,
            subtype=subtype,
            action=action,
            outcome=Outcome.minor_failure,
            agent=AuditAgent(claims.client_id, claims.organization_id, claims.role, claims.person),
            purpose=claims.purpose,
            detail=f"{exc.status}: {exc.issues[0].diagnostics}"[:200],  # fixed texts, no request data
            route=route if isinstance(route, str) else None,
        )
    )


async def authenticate(request: Request, runtime: RuntimeDep) -> Principal:
    request_audit.authentication_attempted()
    try:
        principal = await _authenticate(request, runtime)
        request_audit.identified(agent_of_claims(principal.claims), principal.claims.purpose)
        _rate_limit(request, principal)
    except FhirError as exc:
        claims = getattr(exc, "claims", None)
        if claims is not None:  # a disabled client: identified by its token, refused
            request_audit.identified(agent_of_claims(claims), claims.purpose)
        _audit_denial(request, exc, claims)
        raise
    return principal


def agent_of_claims(claims: AccessClaims) -> AuditAgent:
    return AuditAgent(claims.client_id, claims.organization_id, claims.role, claims.person)


def _rate_limit(request: Request, principal: Principal) -> None:
    """Charge the client's bucket for this request (after authentication: the key is the client)."""
    limiter: RateLimiter | None = getattr(request.app.state, "rate_limiter", None)
    if limiter is None:
        return
    route = getattr(request.scope.get("route"), "path", None)
    cost = limiter.costs.of(request.method, route if isinstance(route, str) else None)
    retry_after = limiter.charge(principal.client_id, cost)
    if retry_after is not None:
        error = FhirError.single(
            429, "throttled", "rate limit exceeded for this client", headers={"Retry-After": str(retry_after)}
        )
        error.claims = principal.claims  # type: ignore[attr-defined]  # names the client in the audit entry
        raise error


async def _authenticate(request: Request, runtime: Runtime) -> Principal:
    header = request.headers.get("authorization")
    if not header:
        raise _unauthorized(None, "an access token is required")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("invalid_request", "use the Bearer scheme")
    try:
        claims = runtime.tokens.verify(token.strip(), now=datetime.now(UTC))
        scopes = tuple(parse_scopes(claims.scope))
    except (TokenInvalid, ScopeError) as exc:
        raise _unauthorized("invalid_token", "the access token is invalid or expired") from exc
    if not await runtime.client_status.is_active(claims.client_id):
        error = _unauthorized("invalid_token", "the access token is invalid or expired")
        error.claims = claims  # type: ignore[attr-defined]  # for the audit entry: a disabled client
        raise error
    return Principal(claims, scopes)


PrincipalDep = Annotated[Principal, Depends(authenticate)]

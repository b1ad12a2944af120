"""Request dependencies, declared once so that a route's signature reads as its contract."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from security.access_tokens import AccessClaims, TokenInvalid
from security.scopes import Scope, ScopeError, parse_scopes, scopes_allow
from service.errors import FhirError
from service.runtime import Runtime


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def _session(runtime: RuntimeDep) -> AsyncIterator[AsyncSession]:
    # The request owns the transaction: commit when the route returns, before
    # the response is sent (scope="function"), roll back on any error.
    async with runtime.database.sessions() as session, session.begin():
        yield session


SessionDep = Annotated[AsyncSession, Depends(_session, scope="function")]


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


async def authenticate(request: Request, runtime: RuntimeDep) -> Principal:
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
        raise _unauthorized("invalid_token", "the access token is invalid or expired")
    return Principal(claims, scopes)


PrincipalDep = Annotated[Principal, Depends(authenticate)]


def _forbidden(description: str) -> FhirError:
    challenge = f'Bearer realm="mhr", error="insufficient_scope", error_description="{description}"'
    return FhirError.single(
        403,
        "forbidden",
        description,
        headers={"WWW-Authenticate": challenge},
    )


def requires(
    resource_type: str, permission: str, *, roles: frozenset[str]
) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency admitting only the given roles holding a scope for the interaction."""

    async def check(principal: PrincipalDep) -> Principal:
        if principal.role not in roles:
            raise _forbidden("this client's role may not use this interaction")
        if not principal.may(resource_type, permission):
            raise _forbidden(f"the token lacks a scope for {resource_type} ({permission})")
        return principal

    return check


ALL_ROLES = frozenset({"clinic", "authority", "auditor", "admin"})
OrganizationReader = Annotated[Principal, Depends(requires("Organization", "r", roles=ALL_ROLES))]
OrganizationSearcher = Annotated[Principal, Depends(requires("Organization", "s", roles=ALL_ROLES))]

"""The token endpoint's use-case: SMART Backend Services client_credentials with private_key_jwt."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from security.access_tokens import AccessClaims, AccessTokenCodec
from security.client_assertion import (
    AssertionInvalid,
    unverified_kid_and_issuer,
    verify_client_assertion,
)
from security.roles import Role
from security.scopes import format_scopes, grantable_scopes, intersect, parse_scopes, role_ceiling
from service.identity.jwks import JwksCache, JwksUnavailable
from service.identity.repository import IdentityRepository

log = logging.getLogger(__name__)

CLIENT_CREDENTIALS = "client_credentials"
# Roles whose every read is a disclosure decided by purpose: a token without one would see nothing.
PURPOSE_REQUIRED = frozenset({Role.authority})
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class OAuthError(Exception):
    """An RFC 6749 error; ``description`` is deliberately vague for authentication failures."""

    def __init__(
        self,
        error: str,
        description: str,
        status: int = 400,
        *,
        reason: str = "",
        client_id: str | None = None,
    ) -> None:
        super().__init__(error)
        self.error = error
        self.description = description
        self.status = status
        self.reason = reason or description  # for the audit entry and logs, never the caller
        # The client, when the refusal came after its assertion's signature verified (else None:
        # an unverified iss names nobody).
        self.client_id = client_id


def _invalid_client(reason: str) -> OAuthError:
    return OAuthError("invalid_client", "client authentication failed", 401, reason=reason)


@dataclass(frozen=True)
class TokenGrant:
    access_token: str
    claims: AccessClaims
    expires_in: int

    def as_response(self) -> dict[str, Any]:
        return {
            "access_token": self.access_token,
            "token_type": "bearer",
            "expires_in": self.expires_in,
            "scope": self.claims.scope,
        }


@dataclass(frozen=True)
class TokenPolicy:
    token_url: str
    lifetime_seconds: int
    assertion_max_lifetime_seconds: int


async def issue_token(
    form: Mapping[str, str],
    *,
    repo: IdentityRepository,
    codec: AccessTokenCodec,
    jwks_cache: JwksCache,
    policy: TokenPolicy,
    now: datetime | None = None,
) -> TokenGrant:
    now = now or datetime.now(UTC)
    grant_type = form.get("grant_type")
    if not grant_type:
        raise OAuthError("invalid_request", "grant_type is required")
    if grant_type != CLIENT_CREDENTIALS:
        raise OAuthError("unsupported_grant_type", "grant_type must be client_credentials")
    if form.get("client_assertion_type") != JWT_BEARER:
        raise OAuthError("invalid_request", "client_assertion_type must be jwt-bearer")
    assertion = form.get("client_assertion")
    if not assertion:
        raise OAuthError("invalid_request", "client_assertion is required")
    requested_scope = form.get("scope", "").strip()
    if not requested_scope:
        raise OAuthError("invalid_scope", "scope is required")

    try:
        _kid, claimed_client = unverified_kid_and_issuer(assertion)
    except AssertionInvalid as exc:
        raise _invalid_client(exc.reason) from exc
    if claimed_client is None:
        raise _invalid_client("no iss")
    client = await repo.client(claimed_client)
    if client is None or not client.active:
        raise _invalid_client("unknown or disabled client")
    org = await repo.organization(client.organization_id)
    if org is None or not org.active:
        raise _invalid_client("organization inactive")

    verified = None
    for refresh in (False, True):
        if client.jwks is not None:
            keys = list(client.jwks.get("keys", []))  # type: ignore[call-overload]
        else:
            assert client.jwks_url is not None
            try:
                keys = await jwks_cache.keys(client.jwks_url, refresh=refresh)
            except JwksUnavailable as exc:
                raise _invalid_client("JWKS unavailable") from exc
        try:
            verified = verify_client_assertion(
                assertion,
                client_id=client.id,
                jwks_keys=keys,
                token_url=policy.token_url,
                now=now,
                max_lifetime_seconds=policy.assertion_max_lifetime_seconds,
            )
            break
        except AssertionInvalid as exc:
            key_miss = exc.reason.startswith("no registered key")
            if client.jwks_url is None or refresh or not key_miss:
                raise _invalid_client(exc.reason) from exc
    assert verified is not None

    # The replay check comes after the signature check, so that nobody can fill
    # the store without the client's key.
    expires_at = datetime.fromtimestamp(verified.expires_at, UTC)
    if not await repo.remember_jti(client.id, verified.jti, expires_at):
        raise _invalid_client("assertion jti replayed")
    await repo.purge_expired_jtis(now)

    # Grant what may be granted and drop the rest; the response's scope says what was granted.
    role = Role(client.role)  # stored as text; registration admits only a Role
    allowed = intersect(parse_scopes(client.scopes), role_ceiling(role))
    granted = intersect(grantable_scopes(requested_scope), allowed)
    if not granted:
        raise OAuthError(
            "invalid_scope",
            "none of the requested scopes may be granted to this client "
            f"(registered: {format_scopes(allowed)})",
            client_id=client.id,
        )
    purpose = _purpose(
        form, verified.purposes, client.purposes.split(), client.default_purpose, role, client.id
    )

    token, claims = codec.issue(
        client_id=client.id,
        organization_id=client.organization_id,
        role=role,
        scope=format_scopes(granted),
        purpose=purpose,
        person=verified.person,
        now=now,
        lifetime_seconds=policy.lifetime_seconds,
    )
    return TokenGrant(token, claims, policy.lifetime_seconds)


def _purpose(
    form: Mapping[str, str],
    asserted: tuple[str, ...],
    registered: list[str],
    default: str | None,
    role: Role,
    client_id: str,
) -> str | None:
    """The token's one purpose of use: from the assertion's HL7 B2B extension (the standard
    way), or the ``purpose_of_use`` form parameter (this server's older way), or the client's
    registered default. Refused with a reason rather than issued to see nothing."""
    legacy = form.get("purpose_of_use") or None
    wanted = list(asserted)
    if legacy is not None and legacy not in wanted:
        wanted.append(legacy)
    if len(wanted) > 1:
        raise OAuthError(
            "invalid_request",
            "one purpose of use per token; request one token per purpose",
            client_id=client_id,
        )
    if wanted:
        if wanted[0] not in registered:
            raise OAuthError(
                "invalid_scope",
                "the purpose of use is not registered for this client "
                f"(registered: {', '.join(registered) or 'none'})",
                client_id=client_id,
            )
        return wanted[0]
    if default is not None and default in registered:
        return default
    if len(registered) == 1:
        return registered[0]
    if role in PURPOSE_REQUIRED:
        raise OAuthError(
            "invalid_request",
            "a purpose of use is required: send it in the client assertion "
            "(extensions.hl7-b2b.purpose_of_use), or register a default purpose for this client"
            + (f" (registered: {', '.join(registered)})" if registered else ""),
            client_id=client_id,
        )
    return None

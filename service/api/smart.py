"""SMART Backend Services discovery and the token endpoint (RFC 6749 errors, not OperationOutcome)."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from security.client_assertion import AssertionInvalid, unverified_kid_and_issuer
from service.api.deps import RuntimeDep, SessionDep
from service.api.refusal_audit import source_address
from service.audit import request_audit
from service.audit.events import Action, AuditAgent, AuditRecord, EventType, Outcome
from service.audit.recorder import record_audit
from service.core.metrics import TOKENS
from service.core.request_context import SOURCE, current_request_id
from service.http.ratelimit import TokenEndpointLimits
from service.identity.repository import IdentityRepository
from service.identity.tokens import OAuthError, issue_token

log = logging.getLogger(__name__)
router = APIRouter()

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
MAX_FORM_FIELDS = 16


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body),
        status_code=status,
        media_type="application/json",
        headers={**_NO_STORE, **(headers or {})},
    )


@router.get("/fhir/.well-known/smart-configuration", tags=["smart"])
async def smart_configuration(runtime: RuntimeDep) -> Response:
    return _json(
        200,
        {
            "issuer": runtime.settings.base_url,
            "token_endpoint": runtime.settings.token_url,
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["ES384", "RS384"],
            "grant_types_supported": ["client_credentials"],
            "scopes_supported": ["system/*.rs", "system/*.cruds", "system/AuditEvent.rs"],
            "capabilities": ["client-confidential-asymmetric", "permission-v2"],
        },
        {"Cache-Control": "public, max-age=3600"},
    )


def _parse_form(body: bytes) -> dict[str, str]:
    try:
        pairs = parse_qsl(
            body.decode("ascii"),
            keep_blank_values=False,
            strict_parsing=True,
            max_num_fields=MAX_FORM_FIELDS,
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise OAuthError("invalid_request", "malformed form body") from exc
    form: dict[str, str] = {}
    for key, value in pairs:
        if key in form:
            raise OAuthError("invalid_request", "a parameter was repeated")
        form[key] = value
    return form


def _claimed_client(form: dict[str, str]) -> str | None:
    """The client an assertion claims to come from (unverified: for the issuance limit only)."""
    try:
        _kid, issuer = unverified_kid_and_issuer(form.get("client_assertion", ""))
    except AssertionInvalid:
        return None
    return issuer[:64] if issuer else None


def _throttled(retry_after: int) -> Response:
    # RFC 6749 defines no error for rate limiting; temporarily_unavailable is the closest.
    return _json(
        429,
        {"error": "temporarily_unavailable", "error_description": "too many token requests; retry later"},
        {"Retry-After": str(retry_after)},
    )


@router.post("/auth/token", tags=["smart"])
async def token(request: Request, runtime: RuntimeDep, session: SessionDep) -> Response:
    limits: TokenEndpointLimits | None = getattr(request.app.state, "token_limits", None)
    address = source_address(request.scope)
    if limits is not None and address is not None:
        retry_after = limits.per_address.charge(address, 1.0)
        if retry_after is not None:
            TOKENS.labels("throttled").inc()
            request_audit.refusal_reason("token requests from this address throttled", throttled=True)
            return _throttled(retry_after)
    claimed: str | None = None
    try:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            raise OAuthError("invalid_request", "use application/x-www-form-urlencoded")
        form = _parse_form(await request.body())
        claimed = _claimed_client(form)
        if limits is not None and claimed is not None:
            retry_after = limits.per_client.wait(claimed, 1.0)
            if retry_after is not None:
                TOKENS.labels("throttled").inc()
                request_audit.refusal_reason("tokens for this client throttled", throttled=True)
                return _throttled(retry_after)
        grant = await issue_token(
            form,
            repo=IdentityRepository(session),
            codec=runtime.tokens,
            jwks_cache=runtime.jwks,
            policy=runtime.token_policy,
        )
    except OAuthError as exc:
        TOKENS.labels(exc.error).inc()
        log.info("token refused", extra={"oauth_error": exc.error, "reason": exc.reason})
        reason = f"{exc.error}: {exc.reason}"[:200]
        if exc.client_id is not None:
            # Refused after the assertion verified: an identified client, a full entry, in the
            # request's transaction (which commits, with the jti the assertion used up).
            await _audit_token(
                session, Outcome.minor_failure, agent=AuditAgent(exc.client_id, None, None), detail=reason
            )
        else:
            # Nobody identified: counted per address and minute by the refusal chokepoint.
            request_audit.refusal_reason(reason[:120])
        headers = {"WWW-Authenticate": 'Bearer realm="mhr"'} if exc.status == 401 else None
        return _json(exc.status, {"error": exc.error, "error_description": exc.description}, headers)
    claims = grant.claims
    if limits is not None:
        limits.per_client.charge(claims.client_id, 1.0)
    agent = AuditAgent(claims.client_id, claims.organization_id, claims.role, claims.person)
    # Committed with the jti before the response leaves: no token without its entry.
    await _audit_token(session, Outcome.success, agent=agent, purpose=claims.purpose)
    TOKENS.labels("issued").inc()
    log.info("token issued", extra={"client_id": grant.claims.client_id, "scope": grant.claims.scope})
    return _json(200, grant.as_response())


async def _audit_token(
    session: SessionDep,
    outcome: Outcome,
    *,
    agent: AuditAgent | None = None,
    purpose: str | None = None,
    detail: str | None = None,
) -> None:
    record = AuditRecord(
        event_type=EventType.login,
        subtype="token",
        action=Action.execute,
        outcome=outcome,
        # A refused caller is not identified: the client id in its assertion is unverified.
        agent=agent or AuditAgent(None, None, None),
        purpose=purpose,
        detail=detail,
        route="/auth/token",
    )
    await record_audit(session, record, request_id=current_request_id(), source=SOURCE)

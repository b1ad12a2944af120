"""SMART Backend Services discovery and the token endpoint (RFC 6749 errors, not OperationOutcome)."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from service.api.deps import RuntimeDep, SessionDep
from service.identity.repository import IdentityRepository
from service.identity.tokens import OAuthError, issue_token
from service.metrics import TOKENS

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


@router.post("/auth/token", tags=["smart"])
async def token(request: Request, runtime: RuntimeDep, session: SessionDep) -> Response:
    try:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            raise OAuthError("invalid_request", "use application/x-www-form-urlencoded")
        form = _parse_form(await request.body())
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
        headers = {"WWW-Authenticate": 'Bearer realm="mhr"'} if exc.status == 401 else None
        return _json(exc.status, {"error": exc.error, "error_description": exc.description}, headers)
    TOKENS.labels("issued").inc()
    log.info("token issued", extra={"client_id": grant.claims.client_id, "scope": grant.claims.scope})
    return _json(200, grant.as_response())

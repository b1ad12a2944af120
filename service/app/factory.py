"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import gc
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp

from security.keys import KeyProvider
from service.api import audit, erasures, metadata, operations, organizations, records, smart
from service.api.docs import install_docs
from service.api.formats import FhirFormats
from service.api.refusal_audit import RefusalAuditMiddleware
from service.api.search_docs import document_searches
from service.app.background import BackgroundWork
from service.app.logging_setup import configure_logging
from service.audit.events import AuditRecord
from service.audit.tally import run_flusher, stop_flusher
from service.bulk import endpoints as bulk
from service.core.request_context import SOURCE
from service.core.settings import Settings, load_settings
from service.figures import endpoints as figures
from service.http.errors import FHIR_JSON, install_error_handlers
from service.http.middleware import RequestMiddleware
from service.http.ratelimit import RateLimiter, TokenEndpointLimits
from service.keys.keyring_match import KeyringMismatch, check_and_record
from service.records.index_keys import UnknownIndexKey
from service.records.search_params import CONTROL_PARAMETERS, SEARCH_PARAMETERS
from service.runtime.capability import load_capability_statement
from service.runtime.providers import Runtime, build_runtime, close_runtime
from service.subscriptions import endpoints as subscriptions
from service.tasks import endpoints as task_endpoints


def create_app(
    settings: Settings | None = None, *, runtime: Runtime | None = None, keys: KeyProvider | None = None
) -> FastAPI:
    """Build the app. Migrations are applied by ``mhr serve`` before this runs.

    ``keys``: a key provider already open, instead of the one the settings name."""
    settings = runtime.settings if runtime is not None else (settings or load_settings())
    settings.check_safe_to_start()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = runtime is None
        app.state.runtime = runtime or build_runtime(settings, keys=keys)
        try:
            await check_and_record(app.state.runtime.database, app.state.runtime.keys)
        except KeyringMismatch as exc:
            if owned:
                await close_runtime(app.state.runtime)
            raise KeyringMismatch(f"refusing to start: {settings.key_store}: {exc}") from None
        # Which blind-index keys are in use before the first request (a rotation may be under way).
        try:
            async with app.state.runtime.database.reading() as session:
                await app.state.runtime.records.index_keys.refresh(session)
        except UnknownIndexKey as exc:
            if owned:
                await close_runtime(app.state.runtime)
            raise KeyringMismatch(f"refusing to start: {settings.key_store}: {exc}") from None
        # The audit integrator and the job workers of this process (service.app.background), or
        # only this process's own part where a background process runs the rest.
        background = BackgroundWork(
            app.state.runtime, job_workers=settings.job_workers, shared=settings.background_in_server
        )
        background.start()
        flusher = start_refusal_flusher(app.state.runtime)
        # What start-up built (the IG, the validator's models, the routes) lives as long as the
        # process: out of the collector's sight, it is not re-scanned by every full collection.
        gc.freeze()
        try:
            yield
        finally:
            await stop_flusher(flusher)  # writes what is counted so far, through the audit writer
            await app.state.runtime.audit_writer.drain()
            # A job still running has had the graceful period since the drain began to finish.
            await background.stop(settings.graceful_shutdown_seconds)
            if owned:
                await close_runtime(app.state.runtime)

    app = FastAPI(
        title="mhr: migrant health records",
        version="0.1.0",
        description=(
            "Pre-migration health assessments as FHIR R4 (4.0.1), encrypted at rest, disclosed "
            "to receiving health authorities only as the migrant's consent allows, with "
            "a tamper-evident audit log. Authenticate with SMART Backend Services."
        ),
        lifespan=lifespan,
        redirect_slashes=False,
        # Served from local assets below (service.api.docs); ReDoc only exists on a CDN.
        docs_url=None,
        redoc_url=None,
    )
    if runtime is not None:
        app.state.runtime = runtime
    app.state.rate_limiter = RateLimiter.from_settings(settings)
    app.state.token_limits = TokenEndpointLimits.from_settings(settings)
    install_error_handlers(app)
    app.add_middleware(FhirFormats)  # _format, Accept (406 for XML) and _pretty on every /fhir route
    # The generic /fhir/{type} routes come last so that specific ones win.
    for module in (
        smart,
        metadata,
        organizations,
        operations,
        audit,
        erasures,
        bulk,
        figures,
        task_endpoints,
        subscriptions,
        records,
    ):
        app.include_router(module.router)
    install_docs(app, title=f"{app.title}: API docs")
    _document_api(app, settings)
    return app


# Operations anyone may call; every other one needs a bearer access token.
PUBLIC_OPERATIONS = frozenset(
    {
        ("get", "/fhir/metadata"),
        ("get", "/fhir/.well-known/smart-configuration"),
        ("post", "/auth/token"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
    }
)
_OUTCOME = {
    "application/fhir+json": {
        "schema": {
            "type": "object",
            "required": ["resourceType", "issue"],
            "properties": {"resourceType": {"const": "OperationOutcome"}, "issue": {"type": "array"}},
        }
    }
}
_FHIR_BODY = {"application/fhir+json": {"schema": {"type": "object"}}}
_FORM_BODY = {
    "application/x-www-form-urlencoded": {
        "schema": {"type": "object", "additionalProperties": {"type": "string"}}
    }
}
_TOKEN_FORM = {
    "application/x-www-form-urlencoded": {
        "schema": {
            "type": "object",
            "required": ["grant_type", "client_assertion_type", "client_assertion"],
            "properties": {
                "grant_type": {"const": "client_credentials"},
                "client_assertion_type": {"const": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"},
                "client_assertion": {"type": "string"},
                "scope": {"type": "string"},
                "purpose_of_use": {"type": "string"},
            },
        }
    }
}
_OAUTH_ERROR = {
    "application/json": {
        "schema": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "string"}, "error_description": {"type": "string"}},
        }
    }
}
# What any operation may answer besides its success: every one an OperationOutcome.
_ERRORS = {
    "400": "invalid request",
    "401": "no valid access token",
    "403": "the token's role or scopes do not allow this interaction",
    "404": "not found, or not visible to this client",
    "405": "method not allowed",
    "406": "only FHIR JSON is answered (_format or Accept asked for another format)",
    "408": "the request body arrived too slowly",
    "409": "conflict",
    "412": "precondition failed",
    "413": "request body too large",
    "415": "unsupported media type",
    "422": "the resource fails its profile",
    "429": "rate limit exceeded (see Retry-After)",
    "500": "internal error (a correlation id only)",
    "503": "temporarily unavailable (see Retry-After)",
}


def _document_api(app: FastAPI, settings: Settings) -> None:
    """Make the OpenAPI document say what the API does: bearer auth, FHIR bodies read by the
    routes themselves, OperationOutcome errors (FastAPI's 422 is answered as a 400 here)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = FastAPI.openapi(app)
        capability = load_capability_statement(settings.ig_dir, settings)
        document_searches(schema, capability, SEARCH_PARAMETERS, CONTROL_PARAMETERS)
        components = schema.setdefault("components", {})
        components.setdefault("securitySchemes", {})["bearer"] = {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
        }
        paths = schema.get("paths", {})
        # DELETE exists only to say "never deleted" (405 with Allow): not an operation to offer.
        paths.get("/fhir/{resource_type}/{resource_id}", {}).pop("delete", None)
        for path, by_method in paths.items():
            for method, operation in by_method.items():
                for response in operation.get("responses", {}).values():
                    # Routes answer FhirResponse (FHIR_JSON, with its charset); FastAPI calls it a string.
                    for media_type in ("application/fhir+json", FHIR_JSON):
                        fhir = response.get("content", {}).get(media_type)
                        if fhir is not None and fhir.get("schema") in (None, {}, {"type": "string"}):
                            fhir["schema"] = {"type": "object"}  # FHIR JSON, not a string
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                if (method, path) in PUBLIC_OPERATIONS:
                    operation["security"] = []
                else:
                    operation["security"] = [{"bearer": []}]
                if method in ("post", "put") and "requestBody" not in operation:
                    body = _FORM_BODY if path.endswith("/_search") or path == "/auth/token" else _FHIR_BODY
                    # $everything takes its parameters in the query or a Parameters body, or none.
                    required = not path.endswith("/$everything")
                    operation["requestBody"] = {"required": required, "content": body}
                if method in ("post", "put") and path.startswith("/fhir/{resource_type}"):
                    responses.setdefault("201", {"description": "created", "content": _FHIR_BODY})
                for status, text in _ERRORS.items():
                    responses.setdefault(status, {"description": text, "content": _OUTCOME})
        token = paths["/auth/token"]["post"]
        token["requestBody"]["content"] = _TOKEN_FORM
        for status in ("400", "401", "429"):  # OAuth errors (RFC 6749 section 5.2) are plain JSON
            token["responses"][status] = {"description": "OAuth error", "content": _OAUTH_ERROR}
        for signed_note in ("/audit/checkpoint", "/audit/key"):  # C2SP signed note / vkey: text
            paths[signed_note]["get"]["responses"]["200"]["content"] = {
                "text/plain": {"schema": {"type": "string"}}
            }
        schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"] = {
            "text/plain": {"schema": {"type": "string"}}
        }
        schema["paths"]["/readyz"]["get"]["responses"]["503"] = {
            "description": "not ready (see Retry-After)",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def start_refusal_flusher(runtime: Runtime) -> asyncio.Task[None]:
    async def write(records: list[AuditRecord]) -> None:
        await runtime.audit_writer.write(records, request_id=f"tally-{uuid.uuid4().hex}", source=SOURCE)

    return asyncio.create_task(run_flusher(runtime.refusal_tally, write), name="mhr-refusal-tally")


def asgi_app(app: FastAPI, settings: Settings) -> ASGIApp:
    # The refusal chokepoint wraps the request layer, so that it sees that layer's refusals too.
    return RefusalAuditMiddleware(
        RequestMiddleware(
            app,
            max_body_bytes=settings.max_request_bytes,
            body_timeout_seconds=settings.request_body_timeout_seconds,
        ),
        app,
    )


def create_asgi_app() -> ASGIApp:
    """Entry point for uvicorn's ``--factory``: in each worker process, which imports the app
    afresh and so would otherwise log through Python's defaults (exception text included)."""
    settings = load_settings()
    configure_logging(settings.log_level)
    return asgi_app(create_app(settings), settings)

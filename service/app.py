"""The FastAPI application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp

from service.api import audit, metadata, operations, organizations, records, smart
from service.asgi import RequestMiddleware
from service.audit.log import start_integrator, stop_integrator
from service.errors import install_error_handlers
from service.runtime import Runtime, build_runtime
from service.settings import Settings, load_settings


def create_app(settings: Settings | None = None, *, runtime: Runtime | None = None) -> FastAPI:
    """Build the app. Migrations are applied by ``mhr serve`` before this runs."""
    settings = runtime.settings if runtime is not None else (settings or load_settings())
    settings.check_safe_to_start()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = runtime is None
        app.state.runtime = runtime or build_runtime(settings)
        integrator = start_integrator(app.state.runtime)
        try:
            yield
        finally:
            await stop_integrator(integrator)
            if owned:
                await app.state.runtime.database.dispose()

    app = FastAPI(
        title="mhr: migrant health records",
        version="0.1.0",
        description=(
            "Pre-migration health assessments as FHIR R4B, encrypted at rest, disclosed "
            "to receiving health authorities only as the migrant's consent allows, with "
            "a tamper-evident audit log. Authenticate with SMART Backend Services."
        ),
        lifespan=lifespan,
        redirect_slashes=False,
    )
    if runtime is not None:
        app.state.runtime = runtime
    install_error_handlers(app)
    # The generic /fhir/{type} routes come last so that specific ones win.
    for module in (smart, metadata, organizations, operations, audit, records):
        app.include_router(module.router)
    return app


def asgi_app(app: FastAPI, settings: Settings) -> ASGIApp:
    return RequestMiddleware(app, max_body_bytes=settings.max_request_bytes)


def create_asgi_app() -> ASGIApp:
    """Entry point for uvicorn's ``--factory``."""
    settings = load_settings()
    return asgi_app(create_app(settings), settings)

"""Liveness, readiness and metrics for operators and orchestrators."""

from __future__ import annotations

import orjson
from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from service.api.deps import RuntimeDep
from service.core.lifecycle import SHUTDOWN
from service.core.metrics import REGISTRY
from service.keys.keyring_match import describe_mismatch, held_checks, recorded_checks
from service.keys.status import under_retired_versions
from service.runtime.providers import Runtime
from service.store.migrate import current_revision

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> Response:
    return Response(orjson.dumps({"status": "alive"}), media_type="application/json")


@router.get("/readyz")
async def readyz(runtime: RuntimeDep) -> Response:
    if SHUTDOWN.draining:
        # Not coming back: no Retry-After. The balancer should send new requests elsewhere.
        return Response(
            orjson.dumps({"status": "draining", "reason": SHUTDOWN.reason}),
            status_code=503,
            media_type="application/json",
        )
    checks: dict[str, bool] = {"database": await runtime.database.ping()}
    try:
        revision = await current_revision(runtime.database.engine) if checks["database"] else None
    except Exception:
        revision = None
    checks["migrations"] = revision is not None and revision == runtime.head_revision
    # The keyring must still be the one the database's data was written under.
    try:
        recorded = await recorded_checks(runtime.database) if checks["database"] else None
        checks["keyring"] = (
            recorded is not None and describe_mismatch(recorded, held_checks(runtime.keys)) is None
        )
    except Exception:
        checks["keyring"] = False
    ready = all(checks.values())
    headers = None if ready else {"Retry-After": "5"}
    body: dict[str, object] = {"status": "ready" if ready else "unavailable", "checks": checks}
    if checks["database"]:
        # Reported, never a reason to be unready: those migrants' reads answer 503 each, while
        # every other migrant is served; restarting or removing this instance would fix nothing.
        body["reports"] = {"subject_keys_under_retired_kek_versions": await _under_retired(runtime)}
    return Response(
        orjson.dumps(body),
        status_code=200 if ready else 503,
        media_type="application/json",
        headers=headers,
    )


async def _under_retired(runtime: Runtime) -> int | None:
    try:
        async with runtime.database.reading() as session:
            return await under_retired_versions(session, runtime.keys)
    except Exception:
        return None  # the database went away between the checks: its check says so next time


@router.get("/metrics")
async def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

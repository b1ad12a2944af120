"""Bulk Data export over HTTP (Bulk Data Access IG 3.0.0): kick-off, status, files, Groups.

- ``GET|POST /fhir/$export`` and ``/fhir/Group/{id}/$export``: 202 with ``Content-Location``
  (the status URL); the export runs as background jobs (service.bulk.jobs).
- ``GET /fhir/_bulk/status/{id}``: 202 with ``Retry-After`` and ``X-Progress`` while it runs,
  200 with the completion manifest when done; ``DELETE``: cancel (202) and remove the files.
- ``GET /fhir/_bulk/files/{id}/{type}.ndjson``: one output file, decrypted as it streams.
- ``GET /fhir/Group[/{id}]``: the Groups this authority has (service.bulk.groups).

Status and files answer only the client that kicked the export off (``requiresAccessToken``:
its own bearer token): any other caller gets 404, as for an export that does not exist.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from security.envelope import IntegrityError
from service.api.auditing import audit, audit_read, rest_record
from service.api.authorization import (
    AUTHORITY,
    BulkExporter,
    GroupRead,
    GroupSearch,
    Interaction,
    Rule,
    authorize,
)
from service.api.deps import Principal, ReadSessionDep, RuntimeDep, SessionDep

# The one reader of an operation's Parameters body (shared with $everything).
from service.api.records import _operation_parameters
from service.api.responses import FhirResponse
from service.audit.events import Action, AuditEntity
from service.bulk.files import new_file_key, open_file_key
from service.bulk.groups import group_of, groups_of
from service.bulk.jobs import EXPORT_STEP, enqueue_first_step, enqueue_purge
from service.bulk.parameters import NDJSON, check_prefer, parse_export_parameters
from service.bulk.repository import ExportRepository
from service.bulk.step import CANCELLED, COMPLETE, ERROR_TYPE, QUEUED, RUNNING, export_files
from service.http.errors import FHIR_JSON, FhirError, not_found
from service.jobs.queue import DEAD
from service.records.reading import bundle_bytes
from service.store.tables import BulkExport, BulkExportFile, Job

router = APIRouter(tags=["bulk export"])
log = logging.getLogger("mhr.bulk")

_EXPORT_ID = re.compile(r"^[A-Za-z0-9_-]{32}$")
RETRY_AFTER_SECONDS = 2


def _status_url(runtime: RuntimeDep, export_id: str) -> str:
    return f"{runtime.settings.fhir_base_url}/_bulk/status/{export_id}"


def _file_url(runtime: RuntimeDep, export_id: str, resource_type: str) -> str:
    return f"{runtime.settings.fhir_base_url}/_bulk/files/{export_id}/{resource_type}.ndjson"


async def _kick_off(
    request: Request,
    principal: Principal,
    session: SessionDep,
    runtime: RuntimeDep,
    group_id: str | None,
) -> Response:
    lenient = check_prefer(request.headers.getlist("prefer"))
    params = list(request.query_params.multi_items())
    if request.method == "POST":
        params += await _operation_parameters(request)
    parsed = parse_export_parameters(params, lenient=lenient)
    if group_id is not None and group_of(principal.organization_id, group_id) is None:
        raise not_found("Group")
    explicit = any(name == "_type" for name, _ in params)
    types = []
    for resource_type in parsed.types:
        if principal.may(resource_type, "r"):
            types.append(resource_type)
        elif explicit:  # asked for by name: refused, not silently left out
            authorize(principal, Rule(Interaction.export, AUTHORITY, resource_type), resource_type, request)
    purpose = principal.claims.purpose
    if not purpose:
        raise FhirError.single(
            403, "forbidden", "an export needs an access token with a purpose of use (purpose_of_use)"
        )
    now = datetime.now(UTC)
    export_id = secrets.token_urlsafe(24)
    wrapped, _ = new_file_key(runtime.keys, export_id)
    query = request.url.query
    path = "/$export" if group_id is None else f"/Group/{group_id}/$export"
    export = BulkExport(
        id=export_id,
        client_id=principal.client_id,
        organization_id=principal.organization_id,
        purpose=purpose,
        group_id=group_id,
        types=types,
        since=parsed.since,
        until=min(parsed.until, now) if parsed.until is not None else now,
        request_url=f"{runtime.settings.fhir_base_url}{path}" + (f"?{query}" if query else ""),
        state=QUEUED,
        wrapped_key=wrapped,
        cursor_subject=None,
        subjects_done=0,
        resources_done=0,
        created_at=now,
    )
    ExportRepository(session).add(export)
    await session.flush()
    await enqueue_first_step(session, export_id)
    entities = (AuditEntity("Group", group_id),) if group_id is not None else ()
    await audit(
        session,
        rest_record(
            principal,
            "export",
            Action.execute,
            entities=entities,
            query=",".join(sorted({name for name, _ in params})) or None,
            detail=f"export {export_id} queued",
        ),
    )
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "information", "code": "informational", "diagnostics": "export queued"}],
    }
    return Response(
        orjson.dumps(outcome),
        status_code=202,
        media_type=FHIR_JSON,
        headers={"Content-Location": _status_url(runtime, export_id)},
    )


@router.get("/fhir/$export", response_class=FhirResponse, summary="Bulk Data export (system level)")
@router.post("/fhir/$export", response_class=FhirResponse, summary="Bulk Data export (Parameters body)")
async def export_system(
    request: Request, principal: BulkExporter, session: SessionDep, runtime: RuntimeDep
) -> Response:
    """Everything this authority may see, as NDJSON files, asynchronously (``Prefer: respond-async``)."""
    return await _kick_off(request, principal, session, runtime, None)


@router.get("/fhir/Group/{group_id}/$export", response_class=FhirResponse, summary="Bulk Data Group export")
@router.post(
    "/fhir/Group/{group_id}/$export",
    response_class=FhirResponse,
    summary="Bulk Data Group export (Parameters)",
)
async def export_group(
    group_id: str, request: Request, principal: BulkExporter, session: SessionDep, runtime: RuntimeDep
) -> Response:
    """The resources of a Group's members that this authority may see."""
    return await _kick_off(request, principal, session, runtime, group_id)


async def _own_export(session: Any, principal: Principal, export_id: str) -> BulkExport:
    """The caller's own export, or 404 alike for another client's and for none."""
    export = await ExportRepository(session).get(export_id) if _EXPORT_ID.match(export_id) else None
    if export is None or export.client_id != principal.client_id or export.state == "expired":
        raise FhirError.single(404, "not-found", "no such export")
    return export


async def _dead(session: Any, export_id: str) -> bool:
    """Did the export's job chain end dead (every attempt of a step failed)?"""
    found = await session.execute(
        select(Job.id)
        .where(Job.kind == EXPORT_STEP.name, Job.state == DEAD, Job.idempotency_key.like(f"{export_id}:%"))
        .limit(1)
    )
    return found.first() is not None


def _instant(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def manifest(runtime: RuntimeDep, export: BulkExport, files: list[BulkExportFile]) -> dict[str, Any]:
    """The completion manifest (IG "Response - Complete Status")."""
    output = [
        {"type": f.resource_type, "url": _file_url(runtime, export.id, f.resource_type), "count": f.resources}
        for f in files
        if f.resource_type != ERROR_TYPE
    ]
    errors = [
        {"type": ERROR_TYPE, "url": _file_url(runtime, export.id, f.resource_type), "count": f.resources}
        for f in files
        if f.resource_type == ERROR_TYPE
    ]
    return {
        "transactionTime": _instant(export.until),
        "request": export.request_url,
        "requiresAccessToken": True,
        "output": output,
        "error": errors,
    }


@router.get("/fhir/_bulk/status/{export_id}", summary="Bulk Data export status")
async def export_status(
    export_id: str, principal: BulkExporter, session: ReadSessionDep, runtime: RuntimeDep
) -> Response:
    """202 with progress while the export runs; 200 with the manifest when it is complete."""
    export = await _own_export(session, principal, export_id)
    await audit_read(
        runtime, [rest_record(principal, "export-status", Action.read, detail=f"export {export.id}")]
    )
    if export.state in (QUEUED, RUNNING):
        if await _dead(session, export.id):
            raise FhirError.single(500, "exception", "the export failed; start a new one")
        progress = f"{export.subjects_done} migrants, {export.resources_done} resources written"
        return Response(
            status_code=202,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS), "X-Progress": progress},
        )
    if export.state == CANCELLED:
        raise FhirError.single(404, "not-found", "no such export")
    if export.state != COMPLETE:
        raise FhirError.single(500, "exception", "the export failed; start a new one")
    files = await ExportRepository(session).files(export.id)
    headers = {}
    if export.expires_at is not None:
        headers["Expires"] = export.expires_at.astimezone(UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
    return Response(
        orjson.dumps(manifest(runtime, export, files)), media_type="application/json", headers=headers
    )


@router.delete("/fhir/_bulk/status/{export_id}", response_class=FhirResponse, summary="cancel an export")
async def cancel_export(
    export_id: str, principal: BulkExporter, session: SessionDep, runtime: RuntimeDep
) -> Response:
    """Cancel a running export, or say a finished one is no longer needed: its files go (202)."""
    if not _EXPORT_ID.match(export_id):
        raise FhirError.single(404, "not-found", "no such export")
    export = await ExportRepository(session).locked(export_id)  # waits for a running step
    if export is None or export.client_id != principal.client_id or export.state in (CANCELLED, "expired"):
        raise FhirError.single(404, "not-found", "no such export")
    export.state = CANCELLED
    export.expires_at = datetime.now(UTC)
    await enqueue_purge(session, export.id)  # removes the files and the key, durably
    await audit(session, rest_record(principal, "export-cancel", Action.delete, detail=f"export {export.id}"))
    export_files(runtime).remove(export.id)  # at once too; the purge job makes sure
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "information", "code": "informational", "diagnostics": "export cancelled"}],
    }
    return Response(orjson.dumps(outcome), status_code=202, media_type=FHIR_JSON)


@router.get("/fhir/_bulk/files/{export_id}/{file_name}", summary="Bulk Data export file")
async def export_file(
    export_id: str, file_name: str, principal: BulkExporter, session: ReadSessionDep, runtime: RuntimeDep
) -> Response:
    """One output file of a complete export, decrypted as it streams (NDJSON)."""
    export = await _own_export(session, principal, export_id)
    resource_type = file_name.removesuffix(".ndjson")
    found = (
        await ExportRepository(session).file(export.id, resource_type)
        if export.state == COMPLETE and file_name.endswith(".ndjson")
        else None
    )
    if found is None or export.wrapped_key is None:
        raise FhirError.single(404, "not-found", "no such export file")
    files = export_files(runtime)
    if not files.path(export.id, resource_type).is_file():  # removed by a cancel in progress
        raise FhirError.single(404, "not-found", "no such export file")
    cipher = open_file_key(runtime.keys, export.id, export.wrapped_key)
    records = files.records(export.id, resource_type, found.byte_length, found.records)
    await audit_read(
        runtime,
        [
            rest_record(
                principal, "export-file", Action.read, detail=f"export {export.id} {resource_type}"[:200]
            )
        ],
    )

    def stream() -> Iterator[bytes]:
        try:
            for index, sealed in enumerate(records):
                yield cipher.open(resource_type, index, sealed)
        except (IntegrityError, OSError):
            # Cut short on purpose: a client sees a broken transfer, never altered data.
            log.error("export file failed its integrity check", extra={"event": "integrity"})
            raise

    return StreamingResponse(stream(), media_type=NDJSON)


@router.get("/fhir/Group/{group_id}", response_class=FhirResponse, summary="read a Group")
async def read_group(group_id: str, principal: GroupRead) -> Response:
    found = group_of(principal.organization_id, group_id)
    if found is None:
        raise not_found("Group")
    return Response(orjson.dumps(found), media_type=FHIR_JSON)


@router.get("/fhir/Group", response_class=FhirResponse, summary="search Groups")
async def search_groups(request: Request, principal: GroupSearch, runtime: RuntimeDep) -> Response:
    """This authority's own Groups (``_id`` narrows them; other parameters are a 400)."""
    wanted: str | None = None
    for name, value in request.query_params.multi_items():
        if name == "_id":
            wanted = value
        elif name not in ("_format", "_pretty"):
            raise FhirError.single(400, "not-supported", "Group search takes _id only", expression=name[:40])
    base = runtime.settings.fhir_base_url
    found = [g for g in groups_of(principal.organization_id) if wanted is None or g["id"] == wanted]
    entries = [(f"{base}/Group/{g['id']}", orjson.dumps(g), b'"search":{"mode":"match"}') for g in found]
    return Response(bundle_bytes("searchset", entries, total=len(found)), media_type=FHIR_JSON)

"""The auditor API: `AuditEvent` search/read/NDJSON export, checkpoints, the log key and proofs.

Auditor role only (scope ``system/AuditEvent.rs``): a clinic's ``system/*.cruds``
covers AuditEvent by scope, so the role check is what keeps others out.
Auditors read entries (no PHI by construction) and hashes, never clinical data.
Reads of AuditEvent are themselves audited; the integrity endpoints under
``/audit`` are not, so that verifying the log does not grow it.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Annotated

import orjson
from fastapi import APIRouter, Query, Request
from starlette.responses import Response, StreamingResponse

from security import merkle
from service.api.authorization import AuditRead, AuditSearch
from service.api.deps import Principal, RuntimeDep, SessionDep
from service.api.responses import FhirResponse, search_url, searchset
from service.audit import log as audit_log
from service.audit.events import Action, AuditAgent, AuditEntity, AuditRecord, EventType, Outcome
from service.audit.fhir import TYPE_SEARCH, audit_event
from service.audit.log_keys import log_keys
from service.audit.recorder import record_audit
from service.audit.search import (
    AuditQuery,
    QueryError,
    date_range,
    decode_date_position,
    encode_date_position,
    entry_leaf,
    leaves,
    read_entry,
    search_page,
    search_page_by_date,
    stream_entries,
)
from service.core.request_context import SOURCE, current_request_id
from service.http.errors import FhirError, not_found

router = APIRouter()

NDJSON = "application/fhir+ndjson"
MAX_COUNT = 500
MAX_LEAVES = 1000
_SEARCH_PARAMS = {
    "date",
    "agent",
    "agent:identifier",
    "entity",
    "patient",
    "action",
    "outcome",
    "type",
    "_count",
    "_cursor",
    "_format",
    "_pretty",
    "_sort",
}
# _sort: by the entry's date (AuditEvent.recorded), oldest or newest first; without it, log order.
_SORTS = {"date": False, "-date": True}
_ACTIONS = {a.value for a in Action}
_OUTCOMES = {o.value for o in Outcome}


async def _audit_access(
    session: SessionDep,
    principal: Principal,
    subtype: str,
    action: Action,
    *,
    event_type: EventType = EventType.rest,
    query: str | None = None,
    entities: tuple[AuditEntity, ...] = (),
) -> None:
    claims = principal.claims
    record = AuditRecord(
        event_type=event_type,
        subtype=subtype,
        action=action,
        outcome=Outcome.success,
        agent=AuditAgent(claims.client_id, claims.organization_id, claims.role, claims.person),
        purpose=claims.purpose,
        entities=entities,
        query=query,
    )
    await record_audit(session, record, request_id=current_request_id(), source=SOURCE)


def _values(request: Request, name: str) -> list[str]:
    return [v for raw in request.query_params.getlist(name) for v in raw.split(",") if v]


def _agents(request: Request) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``agent`` (a reference, as in FHIR: ``Organization/id``, absolute or not) and
    ``agent:identifier`` (``[system|]client id``: clients are identified, not resources):
    the client ids and organization ids named. A bare id may be either; a value with ``|`` is
    the token form this parameter used to have, kept for clients that send it."""
    clients: list[str] = [v.rpartition("|")[2] for v in _values(request, "agent:identifier")]
    organizations: list[str] = []
    for value in _values(request, "agent"):
        if "|" in value:
            clients.append(value.rpartition("|")[2])
            continue
        kind, _, rid = value.split("/_history/")[0].rstrip("/").rpartition("/")
        if not kind:
            clients.append(rid)
            organizations.append(rid)
        elif kind.rpartition("/")[2] == "Organization" and rid:
            organizations.append(rid)
        else:
            raise FhirError.single(
                400,
                "value",
                "agent is a reference to an Organization; name a client with agent:identifier",
                expression="agent",
            )
    return tuple(clients), tuple(organizations)


def _parse_query(request: Request) -> AuditQuery:
    unknown = set(request.query_params) - _SEARCH_PARAMS
    if unknown and "handling=lenient" not in request.headers.get("prefer", ""):
        raise FhirError.single(
            400, "not-supported", "unknown search parameter", expression=sorted(unknown)[0]
        )
    try:
        dates = tuple(date_range(v) for v in request.query_params.getlist("date"))
    except QueryError as exc:
        raise FhirError.single(400, "value", str(exc), expression=exc.param) from exc
    actions = tuple(_values(request, "action"))
    if any(a not in _ACTIONS for a in actions):
        raise FhirError.single(400, "value", "action must be one of C, R, U, D, E", expression="action")
    outcomes = tuple(_values(request, "outcome"))
    if any(o not in _OUTCOMES for o in outcomes):
        raise FhirError.single(400, "value", "outcome must be one of 0, 4, 8, 12", expression="outcome")
    types: list[str] = []
    for value in _values(request, "type"):
        code = value.rpartition("|")[2]
        if code not in TYPE_SEARCH:
            raise FhirError.single(400, "value", "unknown audit event type", expression="type")
        types.extend(TYPE_SEARCH[code])
    agents, organizations = _agents(request)
    entity = request.query_params.get("entity")
    if entity is not None:
        # "Type/id" (a version suffix or a base URL is accepted and dropped).
        parts = entity.split("/_history/")[0].rstrip("/").split("/")
        if len(parts) < 2:
            raise FhirError.single(400, "value", "entity must be a reference Type/id", expression="entity")
        entity = f"{parts[-2]}/{parts[-1]}"
    patient = request.query_params.get("patient")
    if patient is not None:
        patient = patient.rpartition("/")[2]
    return AuditQuery(
        dates=dates,
        agents=agents,
        agent_organizations=organizations,
        entity=entity,
        patient=patient,
        actions=actions,
        outcomes=outcomes,
        event_types=tuple(dict.fromkeys(types)),
    )


def _wants_ndjson(request: Request, fmt: str | None) -> bool:
    if fmt is not None:
        if fmt in (NDJSON, "ndjson", "application/ndjson"):
            return True
        if fmt in ("json", "application/fhir+json", "application/json"):
            return False
        raise FhirError.single(400, "not-supported", "unsupported _format", expression="_format")
    return NDJSON in request.headers.get("accept", "")


@router.get("/fhir/AuditEvent", tags=["audit"], response_class=FhirResponse)
async def search_audit_events(
    request: Request,
    principal: AuditSearch,
    session: SessionDep,
    runtime: RuntimeDep,
    count: Annotated[int, Query(alias="_count", ge=1, le=MAX_COUNT)] = 50,
    cursor: Annotated[
        str | None, Query(alias="_cursor", description="position of the next page, from a next link")
    ] = None,
    fmt: Annotated[str | None, Query(alias="_format")] = None,
    sort: Annotated[
        str | None, Query(alias="_sort", description="date (oldest first) or -date (newest first)")
    ] = None,
) -> Response:
    query = _parse_query(request)
    if sort is not None and sort not in _SORTS:
        raise FhirError.single(400, "not-supported", "_sort must be date or -date", expression="_sort")
    newest_first = None if sort is None else _SORTS[sort]
    names = ",".join(sorted(k for k in set(request.query_params) if not k.startswith("_")))
    if _wants_ndjson(request, fmt):
        # The export's audit entry commits with this session, before the first byte streams.
        await _audit_access(
            session,
            principal,
            "search-type",
            Action.execute,
            event_type=EventType.export,
            query=names or None,
        )
        sessions = runtime.database.sessions

        async def lines() -> AsyncIterator[bytes]:
            async for entry_id, content, leaf_index in stream_entries(
                sessions, query, newest_first=newest_first
            ):
                yield orjson.dumps(audit_event(entry_id, content, leaf_index)) + b"\n"

        return StreamingResponse(lines(), media_type=NDJSON)

    rows, next_position = await _page(session, query, newest_first, cursor, count)
    await _audit_access(session, principal, "search-type", Action.execute, query=names or None)
    base = runtime.settings.fhir_base_url
    params = [(k, v) for k, v in request.query_params.multi_items() if k not in ("_count", "_cursor")]
    next_url = None
    if next_position is not None:
        next_url = search_url(
            base, "AuditEvent", [*params, ("_count", str(count)), ("_cursor", next_position)]
        )
    entries = [
        {
            "fullUrl": f"{base}/AuditEvent/{entry_id}",
            "resource": audit_event(entry_id, content, leaf_index),
            "search": {"mode": "match"},
        }
        for entry_id, content, leaf_index in rows[:count]
    ]
    here = [("_cursor", cursor)] if cursor is not None else []
    self_url = search_url(base, "AuditEvent", [*params, ("_count", str(count)), *here])
    return FhirResponse(searchset(entries, total=None, self_url=self_url, next_url=next_url))


async def _page(
    session: SessionDep, query: AuditQuery, newest_first: bool | None, cursor: str | None, count: int
) -> tuple[list[tuple[int, bytes, int | None]], str | None]:
    """One page and the next page's position (None on the last page), in log or date order."""
    if newest_first is None:
        if cursor is not None and not (cursor.isascii() and cursor.isdigit() and len(cursor) <= 18):
            raise FhirError.single(
                400, "value", "_cursor is not a position this search wrote", expression="_cursor"
            )
        rows = list(await search_page(session, query, after=int(cursor or 0), limit=count + 1))
        more = len(rows) > count
        return rows[:count], str(rows[count - 1][0]) if more else None
    try:
        after = decode_date_position(cursor) if cursor is not None else None
    except QueryError as exc:
        raise FhirError.single(400, "value", str(exc), expression=exc.param) from exc
    dated = await search_page_by_date(session, query, newest_first=newest_first, after=after, limit=count + 1)
    more = len(dated) > count
    last = dated[count - 1] if more else None
    page = [(entry_id, content, leaf) for entry_id, content, leaf, _ in dated[:count]]
    return page, encode_date_position((last[3], last[0])) if last is not None else None


@router.get("/fhir/AuditEvent/{entry_id}", tags=["audit"], response_class=FhirResponse)
async def read_audit_event(entry_id: str, principal: AuditRead, session: SessionDep) -> FhirResponse:
    if not (entry_id.isascii() and entry_id.isdigit()) or len(entry_id) > 18:
        raise not_found("AuditEvent")
    row = await read_entry(session, int(entry_id))
    if row is None:
        raise not_found("AuditEvent")
    await _audit_access(
        session, principal, "read", Action.read, entities=(AuditEntity("AuditEvent", entry_id),)
    )
    return FhirResponse(audit_event(*row))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _text(body: str) -> Response:
    return Response(body, media_type="text/plain; charset=utf-8", headers={"Cache-Control": "no-store"})


@router.get("/audit/checkpoint", tags=["audit"])
async def latest_checkpoint(_principal: AuditRead, session: SessionDep) -> Response:
    """The latest signed checkpoint (C2SP signed note), as text."""
    checkpoint = await audit_log.latest_checkpoint(session)
    if checkpoint is None:
        raise FhirError.single(404, "not-found", "the audit log has no checkpoint yet")
    return _text(checkpoint.note)


@router.get("/audit/key", tags=["audit"])
async def log_key(_principal: AuditRead, runtime: RuntimeDep) -> Response:
    """The log's verifier key (``<name>+<id>+<key>``) for `mhr audit verify --vkey`."""
    return _text(runtime.log_signer.vkey() + "\n")


@router.get("/audit/keys", tags=["audit"])
async def log_keys_listing(_principal: AuditRead, runtime: RuntimeDep, session: SessionDep) -> Response:
    """Every log key with the checkpoint sizes it signs (``first_size``..``last_size``, the current
    one open-ended), for `mhr audit verify --keys`: verification across key rotations."""
    listing = await log_keys(session, runtime.log_signer.verifier())
    return Response(
        orjson.dumps(listing.as_json()), media_type="application/json", headers={"Cache-Control": "no-store"}
    )


@router.get("/audit/checkpoints", tags=["audit"])
async def list_checkpoints(
    _principal: AuditRead,
    session: SessionDep,
    after: Annotated[int, Query(ge=0)] = 0,
    count: Annotated[int, Query(alias="_count", ge=1, le=MAX_LEAVES)] = MAX_LEAVES,
) -> Response:
    rows = await audit_log.checkpoints_page(session, after=after, limit=count)
    return Response(
        orjson.dumps({"checkpoints": [{"size": c.size, "note": c.note} for c in rows]}),
        media_type="application/json",
    )


@router.get("/audit/leaves", tags=["audit"])
async def list_leaves(
    _principal: AuditRead,
    session: SessionDep,
    start: Annotated[int, Query(ge=0)],
    end: Annotated[int, Query(ge=1)],
) -> Response:
    """Sealed entries' canonical content (what the leaves hash), for recomputing the tree."""
    if end <= start:
        raise FhirError.single(400, "value", "end must exceed start", expression="end")
    rows = await leaves(session, start=start, end=min(end, start + MAX_LEAVES))
    body = {"leaves": [{"index": i, "entry": e, "content": _b64(c)} for i, e, c in rows]}
    return Response(orjson.dumps(body), media_type="application/json")


async def _size_or_latest(session: SessionDep, size: int | None, name: str) -> int:
    latest = await audit_log.tree_size(session)
    if size is None:
        return latest
    if size > latest:
        raise FhirError.single(400, "value", f"{name} exceeds the tree size {latest}", expression=name)
    return size


@router.get("/audit/proof/inclusion", tags=["audit"])
async def inclusion(
    _principal: AuditRead,
    session: SessionDep,
    index: Annotated[int | None, Query(ge=0)] = None,
    entry: Annotated[int | None, Query(ge=1)] = None,
    size: Annotated[int | None, Query(ge=1)] = None,
) -> Response:
    """Audit path for one leaf (by ``index`` or by AuditEvent id ``entry``) in the tree of ``size``."""
    if (index is None) == (entry is None):
        raise FhirError.single(400, "required", "give exactly one of index or entry", expression="index")
    leaf_hash: bytes | None = None
    if entry is not None:
        found = await entry_leaf(session, entry)
        if found is None:
            raise not_found("AuditEvent")
        if found[0] is None:
            raise FhirError.single(
                404, "not-found", "the entry is not sealed yet; retry after the next checkpoint"
            )
        index, leaf_hash = found[0], merkle.leaf_hash(found[1])
    assert index is not None
    tree = await _size_or_latest(session, size, "size")
    if index >= tree:
        raise FhirError.single(400, "value", f"index is not below the tree size {tree}", expression="index")
    proof = await audit_log.inclusion_proof(session, index, tree)
    body: dict[str, object] = {"index": index, "size": tree, "proof": [_b64(h) for h in proof]}
    if entry is not None and leaf_hash is not None:
        body["entry"] = entry
        body["leafHash"] = _b64(leaf_hash)
    checkpoint = await audit_log.checkpoint_at(session, tree)
    if checkpoint is not None:
        body["checkpoint"] = checkpoint.note
    return Response(orjson.dumps(body), media_type="application/json")


@router.get("/audit/proof/consistency", tags=["audit"])
async def consistency(
    _principal: AuditRead,
    session: SessionDep,
    old: Annotated[int, Query(alias="from", ge=1)],
    new: Annotated[int | None, Query(alias="to", ge=1)] = None,
) -> Response:
    """RFC 9162 consistency proof between two tree sizes (``to`` defaults to the latest)."""
    tree = await _size_or_latest(session, new, "to")
    if old > tree:
        raise FhirError.single(400, "value", "from exceeds to", expression="from")
    proof = await audit_log.consistency_proof(session, old, tree)
    body: dict[str, object] = {"from": old, "to": tree, "proof": [_b64(h) for h in proof]}
    checkpoint = await audit_log.checkpoint_at(session, tree)
    if checkpoint is not None:
        body["checkpoint"] = checkpoint.note
    return Response(orjson.dumps(body), media_type="application/json")

"""Follow-up task routes (HTTP only; the rules are in service.tasks.service).

- ``GET /fhir/Task/{id}``: the owning authority (while the migrant's consent admits it) or the
  examining clinic (the requester) reads the Task; anyone else 404.
- ``GET /fhir/Task``: the worklist. An authority sees the tasks it owns, a clinic those it
  requested. ``owner``, ``requester``, ``status`` (comma = or), ``period`` (due date, ``ge``/``le``
  prefixes, repeatable), ``code``, ``patient``, ``_count`` and ``_offset`` (paging).
- ``POST /fhir/Task/{id}/$progress``: the owner changes ``status``, ``businessStatus`` (when
  failing) and ``arrivalDate`` (which re-dates the task), as a Parameters resource. Not PUT: only
  these three elements are the authority's to change; everything else is the service's.
- ``POST /fhir/Task/{id}/$transfer``: the owner hands the task to the authority ``to``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from security.roles import Role
from service.api.auditing import audit, audit_read, rest_record
from service.api.authorization import Interaction, Rule, requires
from service.api.deps import Principal, ReadSessionDep, RuntimeDep, SessionDep
from service.api.fhir_body import read_fhir_json
from service.api.responses import FhirResponse, search_url, searchset
from service.audit.events import Action, AuditEntity, AuditRecord, Outcome
from service.http.errors import FhirError, not_found
from service.records.codec import open_version
from service.records.intake import validation_error
from service.records.repository import RecordRepository
from service.runtime.providers import Runtime
from service.store.tables import FollowupTask
from service.tasks.repository import TaskRepository, Worklist
from service.tasks.service import TaskChange, TaskRefused, admits, change_task, record_outcome, transfer_task
from service.tasks.worksheet import Worksheet, WorksheetInvalid, check_worksheet, load_questionnaire

router = APIRouter(tags=["follow-up tasks"])

READERS = frozenset({Role.clinic, Role.authority})
AUTHORITY = frozenset({Role.authority})
TaskRead = Annotated[Principal, Depends(requires(Rule(Interaction.read, READERS, "Task")))]
TaskSearch = Annotated[Principal, Depends(requires(Rule(Interaction.search, READERS, "Task")))]
TaskProgress = Annotated[Principal, Depends(requires(Rule(Interaction.task_progress, AUTHORITY, "Task")))]
TaskTransfer = Annotated[Principal, Depends(requires(Rule(Interaction.task_transfer, AUTHORITY, "Task")))]

MAX_COUNT = 100
DEFAULT_COUNT = 20


def _bad(diagnostics: str, expression: str, status: int = 400, code: str = "invalid") -> FhirError:
    return FhirError.single(status, code, diagnostics, expression=expression)


async def _visible_task(
    session: Any, principal: Principal, task_id: str, *, owner_only: bool = False, for_update: bool = False
) -> FollowupTask:
    """The task if this caller may see it (its owner while admitted; its requester clinic)."""
    task = await TaskRepository(session).get(task_id, for_update=for_update)
    if task is None:
        raise not_found("Task")
    org = principal.organization_id
    if principal.role == Role.authority and task.owner_org == org:
        if await admits(RecordRepository(session), TaskRepository(session), task, org, datetime.now(UTC)):
            return task
    elif principal.role == Role.clinic and task.requester_org == org and not owner_only:
        return task
    raise not_found("Task")


def _for_caller(body: dict[str, Any], principal: Principal, task: FollowupTask) -> dict[str, Any]:
    """The examining clinic sees the worksheet reference only where the authority shared it."""
    if principal.role == Role.clinic and not task.outcome_shared:
        body.pop("output", None)
    return body


async def _task_body(runtime: Runtime, session: Any, task: FollowupTask) -> dict[str, Any]:
    repo = RecordRepository(session)
    current = await repo.current("Task", task.id)
    subject = await repo.subject(task.subject_id)
    row = await repo.version("Task", task.id, current.version_id) if current is not None else None
    if row is None or subject is None:
        raise not_found("Task")
    body: dict[str, Any] = orjson.loads(open_version(runtime.records.keys.opened(), subject, row))
    return body


def _record(principal: Principal, subtype: str, action: Action, task: FollowupTask, **kw: Any) -> AuditRecord:
    return rest_record(
        principal,
        subtype,
        action,
        entities=(AuditEntity("Task", task.id),),
        patient_ids=(task.subject_id,),
        **kw,
    )


def _json(content: dict[str, Any], status: int = 200) -> Response:
    return FhirResponse(content, status_code=status)


@router.get(
    "/fhir/Task/{resource_id}",
    response_class=FhirResponse,
    summary="read a follow-up task (its owner or its requester)",
)
async def read_task(
    resource_id: str, principal: TaskRead, session: ReadSessionDep, runtime: RuntimeDep
) -> Response:
    task = await _visible_task(session, principal, resource_id)
    body = _for_caller(await _task_body(runtime, session, task), principal, task)
    await audit_read(runtime, [_record(principal, "read", Action.read, task)])
    return _json(body)


def _period(values: list[str]) -> tuple[date | None, date | None]:
    low: date | None = None
    high: date | None = None
    for value in values:
        prefix, text = (value[:2], value[2:]) if value[:2] in ("ge", "le", "eq") else ("eq", value)
        try:
            day = date.fromisoformat(text)
        except ValueError:
            raise _bad("period must be a date (YYYY-MM-DD) with an optional ge/le prefix", "period") from None
        if prefix in ("ge", "eq"):
            low = day if low is None else max(low, day)
        if prefix in ("le", "eq"):
            high = day if high is None else min(high, day)
    return low, high


def _reference_id(value: str, resource_type: str, name: str) -> str:
    found = value.removeprefix(f"{resource_type}/")
    if not found or "/" in found or len(found) > 64:
        raise _bad(f"{name} must be a {resource_type} reference or id", name)
    return found


SEARCH_PARAMS = frozenset({"owner", "requester", "status", "period", "code", "patient", "_count", "_offset"})
IGNORED = frozenset({"_format", "_pretty"})


@router.get("/fhir/Task", response_class=FhirResponse, summary="the follow-up worklist (own tasks only)")
async def search_tasks(
    request: Request, principal: TaskSearch, session: ReadSessionDep, runtime: RuntimeDep
) -> Response:
    params = list(request.query_params.multi_items())
    unknown = sorted({k for k, _ in params} - SEARCH_PARAMS - IGNORED)
    if unknown:
        raise _bad(f"unknown search parameter: {unknown[0]}", unknown[0])
    single = {k: v for k, v in params}
    org = principal.organization_id
    owner = _reference_id(single["owner"], "Organization", "owner") if "owner" in single else None
    requester = (
        _reference_id(single["requester"], "Organization", "requester") if "requester" in single else None
    )
    if principal.role == Role.authority:
        if owner not in (None, org) or (requester is not None and owner is None):
            # Another organization's worklist is not this authority's to see: nothing matches.
            matches_nothing = True
        else:
            matches_nothing = False
        owner, requester = org, requester
    else:
        matches_nothing = requester not in (None, org)
        requester = org
    try:
        count = int(single.get("_count", DEFAULT_COUNT))
        offset = int(single.get("_offset", 0))
    except ValueError:
        raise _bad("_count and _offset must be integers", "_count") from None
    if count < 0 or offset < 0:
        raise _bad("_count and _offset must not be negative", "_count")
    count = min(count, MAX_COUNT)
    due_from, due_to = _period([v for k, v in params if k == "period"])
    statuses = [s for s in single.get("status", "").split(",") if s]
    patient = _reference_id(single["patient"], "Patient", "patient") if "patient" in single else None
    code = single.get("code")
    if code is not None and "|" in code:
        code = code.split("|", 1)[1]
    query = Worklist(
        owner_org=owner,
        requester_org=requester,
        statuses=statuses,
        subject_id=patient,
        code=code,
        due_from=due_from,
        due_to=due_to,
        offset=offset,
        limit=count,
    )
    page: list[FollowupTask] = []
    total = 0
    if not matches_nothing:
        page, total = await TaskRepository(session).worklist(query)
    repo = RecordRepository(session)
    entries = []
    records = []
    base = runtime.settings.fhir_base_url
    for task in page:
        if principal.role == Role.authority and not await admits(
            repo, TaskRepository(session), task, org, datetime.now(UTC)
        ):
            total -= 1  # no longer admitted: the worklist does not show it
            continue
        body = _for_caller(await _task_body(runtime, session, task), principal, task)
        entries.append({"fullUrl": f"{base}/Task/{task.id}", "resource": body, "search": {"mode": "match"}})
        records.append(_record(principal, "search-type", Action.execute, task))
    kept = [(k, v) for k, v in params if k not in ("_offset", *IGNORED)]
    next_url = None
    if offset + count < total and count > 0:
        next_url = search_url(base, "Task", [*kept, ("_offset", str(offset + count))])
    self_url = search_url(base, "Task", params)
    if records:
        await audit_read(runtime, records)
    return _json(searchset(entries, total=total, self_url=self_url, next_url=next_url))


def _parameters(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise _bad("expected a Parameters resource", "Parameters", code="structure")
    found: dict[str, Any] = {}
    for parameter in body.get("parameter") or []:
        if not isinstance(parameter, dict) or not isinstance(parameter.get("name"), str):
            raise _bad("each parameter needs a name", "Parameters.parameter", code="structure")
        values = [v for k, v in parameter.items() if k.startswith("value")]
        if len(values) != 1 or parameter["name"] in found:
            raise _bad("each parameter once, with one value", f"Parameters.parameter.{parameter['name']}")
        found[parameter["name"]] = values[0]
    return found


def _refused(
    exc: TaskRefused,
    principal: Principal,
    subtype: str,
    task: FollowupTask,
    expression: str = "Task.status",
    action: Action = Action.update,
) -> FhirError:
    """The refusal's OperationOutcome, carrying its audit entry (written by the error handler)."""
    error = FhirError.single(exc.status, exc.code, exc.diagnostics, expression=expression)
    error.audit = _record(
        principal, subtype, action, task, outcome=Outcome.minor_failure, detail=f"status-{exc.status}"
    )
    return error


@router.post(
    "/fhir/Task/{resource_id}/$progress",
    response_class=FhirResponse,
    summary="the owning authority moves its task on",
)
async def progress(
    resource_id: str, request: Request, principal: TaskProgress, session: SessionDep, runtime: RuntimeDep
) -> Response:
    given = _parameters(await read_fhir_json(request))
    unknown = sorted(set(given) - {"status", "businessStatus", "arrivalDate"})
    if unknown:
        raise _bad(f"unknown parameter: {unknown[0]}", f"Parameters.parameter.{unknown[0]}")
    for name in given:
        if not isinstance(given[name], str):
            raise _bad(f"{name} must be a code or a date", f"Parameters.parameter.{name}")
    arrival = None
    if "arrivalDate" in given:
        try:
            arrival = date.fromisoformat(given["arrivalDate"])
        except ValueError:
            raise _bad(
                "arrivalDate must be a date (YYYY-MM-DD)", "Parameters.parameter.arrivalDate"
            ) from None
    task = await _visible_task(session, principal, resource_id, owner_only=True, for_update=True)
    change = TaskChange(
        status=given.get("status"), business_status=given.get("businessStatus"), arrival_date=arrival
    )
    try:
        await change_task(
            runtime.records,
            RecordRepository(session),
            runtime.records.keys.opened(),
            task,
            change,
            datetime.now(UTC),
        )
    except TaskRefused as exc:
        raise _refused(exc, principal, "task-progress", task) from None
    await audit(session, _record(principal, "task-progress", Action.update, task, detail=task.status))
    return _json(await _task_body(runtime, session, task))


@router.post(
    "/fhir/Task/{resource_id}/$transfer",
    response_class=FhirResponse,
    summary="the owning authority hands the case on",
)
async def transfer(
    resource_id: str, request: Request, principal: TaskTransfer, session: SessionDep, runtime: RuntimeDep
) -> Response:
    given = _parameters(await read_fhir_json(request))
    target = given.get("to")
    if isinstance(target, dict):
        target = target.get("reference")
    if set(given) != {"to"} or not isinstance(target, str):
        raise _bad("give exactly one parameter 'to': an Organization reference", "Parameters.parameter.to")
    to_org = _reference_id(target, "Organization", "to")
    task = await _visible_task(session, principal, resource_id, owner_only=True, for_update=True)
    try:
        await transfer_task(
            runtime.records,
            RecordRepository(session),
            runtime.records.keys.opened(),
            task,
            to_org,
            datetime.now(UTC),
        )
    except TaskRefused as exc:
        raise _refused(exc, principal, "task-transfer", task, "Parameters.parameter.to") from None
    await audit(session, _record(principal, "task-transfer", Action.update, task, detail="transferred"))
    return _json(
        {
            "resourceType": "Parameters",
            "parameter": [{"name": "return", "resource": await _task_body(runtime, session, task)}],
        }
    )


WorksheetReport = Annotated[
    # The worksheet completes the task: the owner's progress on it, decided by role and owner.
    Principal,
    Depends(requires(Rule(Interaction.task_progress, AUTHORITY, "QuestionnaireResponse"))),
]
WorksheetRead = Annotated[
    Principal, Depends(requires(Rule(Interaction.read, READERS, "QuestionnaireResponse")))
]


def _worksheet_task_id(body: dict[str, Any]) -> str:
    for name in ("basedOn", "partOf"):
        for ref in body.get(name) or []:
            if isinstance(ref, dict) and str(ref.get("reference")).startswith("Task/"):
                return _reference_id(ref["reference"], "Task", name)
    raise _bad(
        "the worksheet must name its Task in basedOn", "QuestionnaireResponse.basedOn", 422, "required"
    )


async def _checked_worksheet(
    request: Request, principal: Principal, session: Any, runtime: Runtime, now: datetime
) -> tuple[FollowupTask, dict[str, Any], Worksheet]:
    """The worksheet as it would be stored, its task (the caller's own), and its facts."""
    body = await read_fhir_json(request)
    if not isinstance(body, dict) or body.get("resourceType") != "QuestionnaireResponse":
        raise _bad("expected a QuestionnaireResponse", "QuestionnaireResponse", code="structure")
    task_id = _worksheet_task_id(body)
    task = await _visible_task(session, principal, task_id, owner_only=True, for_update=True)
    subject = body.get("subject")
    if not isinstance(subject, dict) or subject.get("reference") != f"Patient/{task.subject_id}":
        raise _bad("subject must be the Task's Patient", "QuestionnaireResponse.subject", 422, "value")
    try:
        worksheet = check_worksheet(load_questionnaire(runtime.settings.ig_dir), body, now.date())
    except WorksheetInvalid as exc:
        raise _bad(exc.diagnostics, exc.expression, 422, "value") from None
    response = {k: v for k, v in body.items() if k not in ("id", "meta", "author", "authored")}
    response.update(
        id=str(uuid.uuid4()),
        meta={"versionId": "1", "lastUpdated": now.isoformat().replace("+00:00", "Z")},
        author={"reference": f"Organization/{principal.organization_id}"},
        authored=now.isoformat().replace("+00:00", "Z"),
    )
    issues = runtime.records.validator.validate(response)
    if any(i.severity in ("error", "fatal") for i in issues):
        raise validation_error(issues)
    return task, response, worksheet


@router.post(
    "/fhir/QuestionnaireResponse/$validate",
    response_class=FhirResponse,
    summary="check a worksheet; nothing is stored",
)
async def validate_worksheet(
    request: Request, principal: WorksheetReport, session: ReadSessionDep, runtime: RuntimeDep
) -> Response:
    await _checked_worksheet(request, principal, session, runtime, datetime.now(UTC))
    return _json(
        {
            "resourceType": "OperationOutcome",
            "issue": [
                {"severity": "information", "code": "informational", "diagnostics": "the worksheet is valid"}
            ],
        }
    )


@router.post(
    "/fhir/QuestionnaireResponse",
    response_class=FhirResponse,
    status_code=201,
    summary="the owning authority reports the worksheet",
)
async def report_worksheet(
    request: Request, principal: WorksheetReport, session: SessionDep, runtime: RuntimeDep
) -> Response:
    now = datetime.now(UTC)
    task, response, worksheet = await _checked_worksheet(request, principal, session, runtime, now)
    try:
        await record_outcome(
            runtime.records,
            RecordRepository(session),
            runtime.records.keys.opened(),
            task,
            response,
            worksheet,
            principal.organization_id,
            now,
        )
    except TaskRefused as exc:
        raise _refused(exc, principal, "create", task, action=Action.create) from None
    record = rest_record(
        principal,
        "create",
        Action.create,
        entities=(AuditEntity("QuestionnaireResponse", response["id"]), AuditEntity("Task", task.id)),
        patient_ids=(task.subject_id,),
        detail="worksheet",
    )
    await audit(session, record)
    location = f"{runtime.settings.fhir_base_url}/QuestionnaireResponse/{response['id']}/_history/1"
    return FhirResponse(response, status_code=201, headers={"Location": location})


@router.get(
    "/fhir/QuestionnaireResponse/{resource_id}",
    response_class=FhirResponse,
    summary="read a follow-up worksheet",
)
async def read_worksheet(
    resource_id: str, principal: WorksheetRead, session: ReadSessionDep, runtime: RuntimeDep
) -> Response:
    """The owning authority reads the worksheet of its task; the examining clinic only where the
    authority shared it (and the task is the clinic's own request)."""
    task = await TaskRepository(session).by_response(resource_id)
    if task is None:
        raise not_found("QuestionnaireResponse")
    org = principal.organization_id
    if principal.role == Role.clinic:
        if task.requester_org != org or not task.outcome_shared:
            raise not_found("QuestionnaireResponse")
    else:
        task = await _visible_task(session, principal, task.id, owner_only=True)
    repo = RecordRepository(session)
    current = await repo.current("QuestionnaireResponse", resource_id)
    subject = await repo.subject(task.subject_id)
    row = await repo.version("QuestionnaireResponse", resource_id, current.version_id) if current else None
    if row is None or subject is None:
        raise not_found("QuestionnaireResponse")
    body = orjson.loads(open_version(runtime.records.keys.opened(), subject, row))
    await audit_read(
        runtime,
        [
            rest_record(
                principal,
                "read",
                Action.read,
                entities=(AuditEntity("QuestionnaireResponse", resource_id),),
                patient_ids=(task.subject_id,),
            )
        ],
    )
    return _json(body)

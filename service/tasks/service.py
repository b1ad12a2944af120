"""The follow-up rules. Services only add and flush: the caller's transaction commits.

Creation and withdrawal are one reconciliation per migrant (:func:`reconcile_subject`), run in
the transaction of every write that can change them (an exam, a Consent): a follow-up
classification version that the grant predicate lets an authority see gets a task for that
authority, unless the exam already has its case (a task not cancelled: the case then moves by
transfer) or that authority already had one for it; an open task whose owner the predicate no
longer admits is cancelled with businessStatus ``consent-withdrawn``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import orjson

from service.records.codec import open_version
from service.records.context import RecordServices
from service.records.grant_predicate import GrantFilter
from service.records.repository import RecordRepository, VersionRow
from service.records.subject_keys import OpenedKeys
from service.store.tables import FollowupTask
from service.tasks import classes
from service.tasks.notify import task_event
from service.tasks.overdue_job import schedule_sweep
from service.tasks.repository import TaskRepository
from service.tasks.resource import write_task, write_version
from service.tasks.transitions import OPEN, WITHDRAWN, Refusal, check_move
from service.tasks.worksheet import Worksheet

TB_TASK_CODE = "tb-followup"
CLASS_B_TASK_CODE = "class-b-followup"


class TaskRefused(Exception):
    """A refused change to a task: the status to answer and a message without PHI."""

    def __init__(self, status: int, diagnostics: str, code: str = "business-rule") -> None:
        super().__init__(diagnostics)
        self.status = status
        self.diagnostics = diagnostics
        self.code = code


@dataclass(frozen=True)
class TaskChange:
    """What an authority asks of its task; None leaves a value as it is."""

    status: str | None = None
    business_status: str | None = None
    arrival_date: date | None = None


async def admits(
    repo: RecordRepository, tasks: TaskRepository, task: FollowupTask, organization_id: str, now: datetime
) -> bool:
    """Does the grant predicate let ``organization_id`` see the task's classification now?"""
    focus = await repo.current("Observation", task.focus_id)
    if focus is None:
        return False
    for purpose in sorted(await tasks.grant_purposes(task.subject_id, organization_id)):
        grant = GrantFilter(organization_id, purpose, now)
        if await repo.permit_for_version("Observation", focus.id, focus.version_id, grant) is not None:
            return True
    return False


async def _followup_focuses(
    repo: RecordRepository, keys: OpenedKeys, subject_id: str
) -> list[tuple[VersionRow, str]]:
    subject = await repo.subject(subject_id)
    if subject is None or subject.wrapped_key is None:
        return []
    found = []
    for row in await repo.current_of_type(subject_id, "Observation"):
        body: Any = orjson.loads(open_version(keys, subject, row))
        classification = classes.followup_class(body)
        if classification is not None:
            found.append((row, classification))
    return found


async def reconcile_subject(
    services: RecordServices, repo: RecordRepository, keys: OpenedKeys, subject_id: str, now: datetime
) -> None:
    """Create the tasks this migrant's disclosures call for; cancel those no longer admitted."""
    tasks = TaskRepository(repo.session)
    existing = await tasks.for_subject(subject_id)
    for task in existing:
        if task.status in OPEN and not await admits(repo, tasks, task, task.owner_org, now):
            task.status = "cancelled"
            task.business_status = WITHDRAWN
            task.closed_at = now
            task.updated_at = now
            await write_task(services, repo, keys, task, now)
    # One case per exam: a task for it that is not cancelled (open, or closed with a result)
    # is the case, and moves between authorities by transfer, not by a second task.
    taken = {t.focus_id for t in existing if t.status != "cancelled"}
    known = {(t.focus_id, t.origin_org) for t in existing} | {(t.focus_id, t.owner_org) for t in existing}
    candidates = await tasks.granted_authorities(subject_id)
    if not candidates:
        return
    for row, classification in await _followup_focuses(repo, keys, subject_id):
        for organization_id, purposes in sorted(candidates.items()):
            if row.id in taken or (row.id, organization_id) in known:
                continue
            admitted = False
            for purpose in sorted(purposes):
                grant = GrantFilter(organization_id, purpose, now)
                if await repo.permit_for_version("Observation", row.id, row.version_id, grant) is not None:
                    admitted = True
                    break
            if not admitted:
                continue
            task = FollowupTask(
                id=str(uuid.uuid4()),
                subject_id=subject_id,
                focus_id=row.id,
                origin_org=organization_id,
                owner_org=organization_id,
                requester_org=row.organization_id,
                code=TB_TASK_CODE if classification in classes.TB_FOLLOWUP else CLASS_B_TASK_CODE,
                status="requested",
                business_status=None,
                authored_at=now,
                due_date=classes.due_date(classification, now.date(), services.followup_due_days),
                updated_at=now,
            )
            await tasks.add(task)
            await schedule_sweep(repo.session, task.due_date)
            taken.add(row.id)
            await write_task(services, repo, keys, task, now)
            await task_event(repo.session, task, "assigned")


async def _classification(repo: RecordRepository, keys: OpenedKeys, task: FollowupTask) -> str:
    focus = await repo.current("Observation", task.focus_id)
    subject = await repo.subject(task.subject_id)
    if focus is None or subject is None:
        return ""
    row = await repo.version("Observation", focus.id, focus.version_id)
    if row is None:
        return ""
    body: Any = orjson.loads(open_version(keys, subject, row))
    return classes.followup_class(body) or ""


def _refuse(refusal: Refusal) -> TaskRefused:
    return TaskRefused(refusal.status, refusal.diagnostics)


async def change_task(
    services: RecordServices,
    repo: RecordRepository,
    keys: OpenedKeys,
    task: FollowupTask,
    change: TaskChange,
    now: datetime,
) -> FollowupTask:
    """An authority's update of its own task: status, its reason, the arrival date."""
    if task.status not in OPEN:
        raise TaskRefused(409, f"illegal transition from '{task.status}': the task is closed")
    wanted = change.status or task.status
    refusal = check_move(task.status, wanted, change.business_status)
    if refusal is not None:
        raise _refuse(refusal)
    if change.business_status is not None and wanted != "failed":
        raise TaskRefused(422, "businessStatus is only set when the task fails")
    if change.arrival_date is not None:
        if change.arrival_date > now.date():
            raise TaskRefused(422, "the arrival date is in the future", "value")
        classification = await _classification(repo, keys, task)
        task.arrival_date = change.arrival_date
        new_due = classes.due_date(classification, change.arrival_date, services.followup_due_days)
        if new_due != task.due_date:
            task.due_date = new_due
            task.overdue_at = None  # a new due date is raised again once past
            await schedule_sweep(repo.session, new_due)
    task.status = wanted
    if wanted == "failed":
        task.business_status = change.business_status
    if wanted not in OPEN:
        task.closed_at = now
    task.updated_at = now
    await write_task(services, repo, keys, task, now)
    return task


async def transfer_task(
    services: RecordServices,
    repo: RecordRepository,
    keys: OpenedKeys,
    task: FollowupTask,
    to_org: str,
    now: datetime,
) -> FollowupTask:
    """Hand an open task to another authority, if the migrant's consent admits it."""
    tasks = TaskRepository(repo.session)
    if task.status not in OPEN:
        raise TaskRefused(409, f"a '{task.status}' task cannot be transferred")
    if to_org == task.owner_org:
        raise TaskRefused(422, "the task is already owned by this organization", "value")
    if await tasks.organization_kind(to_org) != "authority":
        raise TaskRefused(422, "the new owner must be an active receiving authority", "value")
    if not await admits(repo, tasks, task, to_org, now):
        raise TaskRefused(
            422,
            "the migrant's consent (or a statutory basis) does not admit the new authority to this "
            "case: no transfer without it",
        )
    from_org = task.owner_org
    task.owner_org = to_org
    task.status = "requested"  # the new owner accepts it afresh
    task.updated_at = now
    await tasks.add_transfer(task.id, from_org, to_org, now)
    await write_task(services, repo, keys, task, now)
    await task_event(repo.session, task, "assigned")
    return task


async def record_outcome(
    services: RecordServices,
    repo: RecordRepository,
    keys: OpenedKeys,
    task: FollowupTask,
    response: dict[str, Any],
    worksheet: Worksheet,
    owner_org: str,
    now: datetime,
) -> FollowupTask:
    """Store the worksheet (encrypted, the authority's) and complete the task with its facts."""
    refusal = check_move(task.status, "completed", None)
    if task.status == "completed" or refusal is not None:
        raise TaskRefused(
            409,
            f"illegal transition from '{task.status}' to 'completed': report the "
            "worksheet of a task in progress",
        )
    await write_version(services, repo, keys, response, task.subject_id, owner_org, now)
    if task.arrival_date != worksheet.arrival_date:
        task.arrival_date = worksheet.arrival_date
    task.evaluated_on = worksheet.evaluated_on
    task.outcome = worksheet.outcome
    task.outcome_shared = worksheet.shared_with_clinic
    task.outcome_response_id = response["id"]
    task.status = "completed"
    task.closed_at = now
    task.updated_at = now
    await write_task(services, repo, keys, task, now)
    return task

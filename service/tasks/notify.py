"""The one place a follow-up task event leaves its use-case: ``task_event``.

It writes an audit entry (pseudonymous ids and the event kind only, never PHI) and publishes
the event on the subscription topic task-assigned or task-overdue to the task's owner, in the
caller's transaction (service.subscriptions; delivery checks the owner still holds the task).
"""

from __future__ import annotations

from typing import Literal

from sqlalchemy.ext.asyncio import AsyncSession

from service.audit.events import Action, AuditAgent, AuditEntity, AuditRecord, EventType, Outcome
from service.audit.recorder import record_audit
from service.core.request_context import current_request_id
from service.store.tables import FollowupTask
from service.subscriptions.events import Event, Focus, publish
from service.subscriptions.topics import Topic

TaskEventKind = Literal["assigned", "overdue"]
SOURCE = "mhr-tasks"
TOPICS: dict[TaskEventKind, Topic] = {"assigned": Topic.task_assigned, "overdue": Topic.task_overdue}


async def task_event(session: AsyncSession, task: FollowupTask, kind: TaskEventKind) -> None:
    """Tell the task's current owner: it was assigned the task, or the task is overdue.

    Written in the caller's transaction, so that the event exists exactly when the change does.
    """
    record = AuditRecord(
        event_type=EventType.rest,
        subtype=f"task-{kind}",
        action=Action.execute,
        outcome=Outcome.success,
        agent=AuditAgent(client_id=None, organization_id=None, role="system"),
        entities=(AuditEntity("Task", task.id),),
        patient_ids=(task.subject_id,),
        detail=kind,
        recipients=(task.owner_org,),
    )
    await record_audit(session, record, request_id=current_request_id(), source=SOURCE)
    await publish(
        session, [Event(TOPICS[kind], task.owner_org, Focus("Task", task.id), subject_id=task.subject_id)]
    )

"""The one place a follow-up task event leaves its use-case: ``task_event``.

Today it writes an audit entry (pseudonymous ids and the event kind only, never PHI); the
subscription topics task-assigned / task-overdue hang off this function too.
"""

from __future__ import annotations

from typing import Literal

from sqlalchemy.ext.asyncio import AsyncSession

from service.audit.events import Action, AuditAgent, AuditEntity, AuditRecord, EventType, Outcome
from service.audit.recorder import record_audit
from service.request_context import current_request_id
from service.store.tables import FollowupTask

TaskEventKind = Literal["assigned", "overdue"]
SOURCE = "mhr-tasks"


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

"""The follow-up Task as a FHIR resource, written like every resource: validated, labelled,
sealed under the migrant's key, one immutable version per change.

The stored version belongs to the examining clinic's tenancy (``organization_id`` is the
requester): erasure, key rotation and relabelling treat it with the migrant's other data. The
task routes (service.tasks.endpoints) decide who else may read it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from security.envelope import ciphertext_digest, resource_aad
from service.records.context import RecordServices
from service.records.indexing import index_resource, labels_token
from service.records.repository import RecordRepository, WriteBatch
from service.records.subject_keys import OpenedKeys
from service.store.tables import FollowupTask

TASK_CODE_SYSTEM = "https://mhr.example.org/fhir/CodeSystem/followup-task"
BUSINESS_STATUS_SYSTEM = "https://mhr.example.org/fhir/CodeSystem/followup-business-status"
ARRIVAL_INPUT = "arrival-date"
SYSTEM_CLIENT = "mhr-tasks"  # the writer of every Task version: the service itself


def _instant(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def task_resource(task: FollowupTask, version_id: int, now: datetime) -> dict[str, Any]:
    """The Task as FHIR R4 JSON, from its row (which holds all a Task here says)."""
    resource: dict[str, Any] = {
        "resourceType": "Task",
        "id": task.id,
        "meta": {"versionId": str(version_id), "lastUpdated": _instant(now)},
        "status": task.status,
        "intent": "order",
        "code": {"coding": [{"system": TASK_CODE_SYSTEM, "code": task.code}]},
        "focus": {"reference": f"Observation/{task.focus_id}"},
        "for": {"reference": f"Patient/{task.subject_id}"},
        "authoredOn": _instant(task.authored_at),
        "lastModified": _instant(now),
        "requester": {"reference": f"Organization/{task.requester_org}"},
        "owner": {"reference": f"Organization/{task.owner_org}"},
        "restriction": {"period": {"end": task.due_date.isoformat()}},
    }
    if task.business_status is not None:
        resource["businessStatus"] = {
            "coding": [{"system": BUSINESS_STATUS_SYSTEM, "code": task.business_status}]
        }
    if task.arrival_date is not None:
        resource["input"] = [
            {
                "type": {"coding": [{"system": TASK_CODE_SYSTEM, "code": ARRIVAL_INPUT}]},
                "valueDate": task.arrival_date.isoformat(),
            }
        ]
    if task.outcome_response_id is not None:
        resource["output"] = [
            {
                "type": {"coding": [{"system": TASK_CODE_SYSTEM, "code": "worksheet"}]},
                "valueReference": {"reference": f"QuestionnaireResponse/{task.outcome_response_id}"},
            }
        ]
    return resource


async def write_task(
    services: RecordServices,
    repo: RecordRepository,
    keys: OpenedKeys,
    task: FollowupTask,
    now: datetime,
) -> int:
    """Write the Task's next version from its row; returns the version number."""
    current = await repo.current_for_update("Task", task.id)
    version_id = current.version_id + 1 if current is not None else 1
    resource = task_resource(task, version_id, now)
    await write_version(services, repo, keys, resource, task.subject_id, task.requester_org, now)
    return version_id


async def write_version(
    services: RecordServices,
    repo: RecordRepository,
    keys: OpenedKeys,
    resource: dict[str, Any],
    subject_id: str,
    organization_id: str,
    now: datetime,
) -> None:
    """Validate, label, seal and store the next version of ``resource`` (its meta already set).

    Only the service's own resources come here (a Task, an authority's worksheet already checked
    against its Questionnaire): an invalid one is a defect, not bad input.
    """
    resource_type, resource_id = resource["resourceType"], resource["id"]
    version_id = int(resource["meta"]["versionId"])
    current = await repo.current_for_update(resource_type, resource_id)
    issues = services.validator.validate(resource)
    if any(i.severity in ("error", "fatal") for i in issues):
        raise RuntimeError(f"service-written {resource_type} failed validation")
    labels = services.labeler.apply(resource)
    body = orjson.dumps(resource)
    subject = await repo.subject(subject_id)
    assert subject is not None
    cipher = keys.cipher(subject.id, subject.wrapped_key, subject.key_version)
    blob = cipher.seal(body, resource_aad(resource_type, resource_id, version_id, subject_id))
    # The migrant's own index key (service.records.index_keys), read as intake reads it.
    indexer = services.index_keys.for_kid(await repo.subject_index_key(subject_id))
    batch = WriteBatch()
    batch.add(
        {
            "resource_type": resource_type,
            "id": resource_id,
            "version_id": version_id,
            "subject_id": subject_id,
            "organization_id": organization_id,
            "last_updated": now,
            "ciphertext": blob,
            "ciphertext_sha256": ciphertext_digest(blob),
            "client_id": SYSTEM_CLIENT,
        },
        clinical_date=None,
        labels_token=labels_token(indexer, labels),
        tokens=index_resource(indexer, resource).tokens,
        current=current,
    )
    await repo.write_batch(batch)

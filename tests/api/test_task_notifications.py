"""Follow-up task events reach their owner's subscriptions (issue #16 item 4, #15 topics).

The task-assigned and task-overdue topics carry the Task id only; they are published in the
transaction that assigns or marks the task, and shown (``$events``, delivery) only while the
subscriber still owns the task: a task transferred away, or ended by a withdrawn consent, is
not told of. Both databases (the ``service`` fixture)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from mhr_testkit import Party, Service
from test_followup_tasks import Loop, _one_task, make_loop
from test_subscriptions import _events, _focuses, _status_parameters, _subscribe

from service.cli import main as cli
from service.records.repository import RecordRepository
from service.store.database import Database
from service.subscriptions.topics import Topic
from service.tasks.overdue_job import mark_overdue

ASSIGNED = Topic.task_assigned.value
OVERDUE = Topic.task_overdue.value


@pytest.fixture
def loop(service: Service) -> Loop:
    return make_loop(service)


def _task_focuses(loop: Loop, party: Party, subscription_id: str) -> list[str]:
    reply = _events(loop.service, party, subscription_id)
    assert reply.status_code == 200, reply.text
    return _focuses(reply.json())


def _issued(loop: Loop, party: Party, subscription_id: str) -> int:
    reply = _events(loop.service, party, subscription_id)
    return int(_status_parameters(reply.json())["events-since-subscription-start"])


def test_an_assigned_task_is_published_to_its_owner_only(loop: Loop) -> None:
    to_a = _subscribe(loop.service, loop.a, ASSIGNED)
    to_b = _subscribe(loop.service, loop.b, ASSIGNED)
    loop.post_consent(loop.a.organization_id)
    task_id = _one_task(loop, loop.a)["id"]
    base = loop.service.settings.fhir_base_url
    assert _task_focuses(loop, loop.a, to_a) == [f"{base}/Task/{task_id}"]
    assert _issued(loop, loop.b, to_b) == 0  # not B's task: nothing issued to B at all


def test_a_transfer_tells_the_new_owner_and_hides_the_old_owners_event(loop: Loop) -> None:
    to_a = _subscribe(loop.service, loop.a, ASSIGNED)
    to_b = _subscribe(loop.service, loop.b, ASSIGNED)
    loop.post_consent(loop.a.organization_id)
    task_id = _one_task(loop, loop.a)["id"]
    loop.post_consent(loop.b.organization_id)
    assert loop.op(loop.a, task_id, "transfer", to=loop.b.organization_id).status_code == 200
    base = loop.service.settings.fhir_base_url
    assert _task_focuses(loop, loop.b, to_b) == [f"{base}/Task/{task_id}"]
    # A's event keeps its number (a receiver sees the gap) but no longer names the task.
    assert _issued(loop, loop.a, to_a) == 1
    assert _task_focuses(loop, loop.a, to_a) == []


def test_a_withdrawn_consent_hides_the_assignment(loop: Loop) -> None:
    to_a = _subscribe(loop.service, loop.a, ASSIGNED)
    consent_id = loop.post_consent(loop.a.organization_id)
    assert len(_task_focuses(loop, loop.a, to_a)) == 1
    loop.withdraw(consent_id)
    assert _task_focuses(loop, loop.a, to_a) == []


def test_an_overdue_task_notifies_its_owner_once(loop: Loop) -> None:
    overdue = _subscribe(loop.service, loop.a, OVERDUE)
    loop.post_consent(loop.a.organization_id)
    task_id = _one_task(loop, loop.a)["id"]

    async def sweep(days: int) -> int:
        database = Database(loop.service.settings.database_url)
        try:
            async with database.transaction() as session:
                today = datetime.now(UTC).date() + timedelta(days=days)
                return await mark_overdue(RecordRepository(session), today)
        finally:
            await database.dispose()

    assert asyncio.run(sweep(0)) == 0
    assert _issued(loop, loop.a, overdue) == 0
    assert asyncio.run(sweep(30)) == 1
    assert asyncio.run(sweep(31)) == 0
    base = loop.service.settings.fhir_base_url
    assert _task_focuses(loop, loop.a, overdue) == [f"{base}/Task/{task_id}"]


def test_the_overdue_command_raises_and_notifies_once(
    loop: Loop,
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MHR_ENV", "development")
    monkeypatch.setenv("MHR_DATABASE_URL", database_url)
    monkeypatch.setenv("MHR_KEYRING_PATH", str(tmp_path / "keyring.json"))
    monkeypatch.chdir(tmp_path)
    overdue = _subscribe(loop.service, loop.a, OVERDUE)
    loop.post_consent(loop.a.organization_id)
    task_id = _one_task(loop, loop.a)["id"]
    assert cli.main(["tasks", "overdue"]) == 0  # nothing is due today
    later = (datetime.now(UTC).date() + timedelta(days=40)).isoformat()
    assert cli.main(["tasks", "overdue", "--as-of", later]) == 0
    assert cli.main(["tasks", "overdue", "--as-of", later]) == 0  # once per due date
    assert capsys.readouterr().out.splitlines()[-3:] == [
        f"0 task(s) raised as overdue as of {datetime.now(UTC).date().isoformat()}",
        f"1 task(s) raised as overdue as of {later}",
        f"0 task(s) raised as overdue as of {later}",
    ]
    base = loop.service.settings.fhir_base_url
    assert _task_focuses(loop, loop.a, overdue) == [f"{base}/Task/{task_id}"]
    assert cli.main(["tasks", "overdue", "--as-of", "next week"]) == 2
    assert "not a date" in capsys.readouterr().err

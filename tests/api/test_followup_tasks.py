"""Follow-up tasks: created when a Class B classification is disclosed to an authority, moved on
by that authority only, ended by a withdrawal, transferred only where consent admits the new
owner; the examining clinic sees the status. Both databases (the ``service`` fixture)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from mhr_testkit import EXAMPLES, FHIR_HEADERS, Party, Service, load_example, submit, sync_url
from test_disclosure import consent

from service.records.relabel import RelabelCounts, relabel
from service.records.repository import RecordRepository
from service.store.database import Database
from service.tasks.overdue_job import mark_overdue

B1_EXAMPLE = next(p for p in EXAMPLES if p.name == "exam-adult-b1-pulmonary.json")
B2_EXAMPLE = next(p for p in EXAMPLES if p.name == "exam-child-igra-b2.json")
NORMAL_EXAMPLE = next(p for p in EXAMPLES if p.name == "exam-adult-normal.json")


@dataclass
class Loop:
    service: Service
    clinic: Party
    a: Party
    b: Party
    patient: str

    def post_consent(self, organization_id: str, **kw: Any) -> str:
        reply = self.service.client.post(
            "/fhir/Consent",
            content=json.dumps(consent(self.patient, organization_id, **kw)),
            headers={**FHIR_HEADERS, **self.service.headers(self.clinic)},
        )
        assert reply.status_code == 201, reply.text
        return str(reply.json()["id"])

    def withdraw(self, consent_id: str) -> None:
        headers = self.service.headers(self.clinic)
        current = self.service.client.get(f"/fhir/Consent/{consent_id}", headers=headers).json()
        current["status"] = "inactive"
        reply = self.service.client.put(
            f"/fhir/Consent/{consent_id}", content=json.dumps(current), headers={**FHIR_HEADERS, **headers}
        )
        assert reply.status_code == 200, reply.text

    def get(self, party: Party, path: str, **params: str) -> Any:
        return self.service.client.get(path, params=params, headers=self.service.headers(party))

    def worklist(self, party: Party, **params: str) -> list[dict[str, Any]]:
        reply = self.get(party, "/fhir/Task", **params)
        assert reply.status_code == 200, reply.text
        return [e["resource"] for e in reply.json().get("entry", [])]

    def op(self, party: Party, task_id: str, name: str, **values: Any) -> Any:
        parameters = []
        for key, value in values.items():
            kind = "valueDate" if key == "arrivalDate" else "valueCode"
            if key == "to":
                kind = "valueReference"
                value = {"reference": f"Organization/{value}"}
            parameters.append({"name": key, kind: value})
        return self.service.client.post(
            f"/fhir/Task/{task_id}/${name}",
            content=json.dumps({"resourceType": "Parameters", "parameter": parameters}),
            headers={**FHIR_HEADERS, **self.service.headers(party)},
        )


def _patient_of(reply: Any) -> str:
    locations = [e["response"]["location"].split("/")[:2] for e in reply.json()["entry"]]
    return next(i for t, i in locations if t == "Patient")


@pytest.fixture
def loop(service: Service) -> Loop:
    return make_loop(service)


def make_loop(service: Service) -> Loop:
    """A clinic, authorities A and B, and a B1 exam submitted: the start of every follow-up case."""
    clinic = service.register("clinic", "clinic")
    a = service.register("authority A", "authority", purposes=("PUBHLTH",))
    b = service.register("authority B", "authority", purposes=("PUBHLTH",))
    reply = submit(service, clinic, load_example(B1_EXAMPLE))
    assert reply.status_code == 200, reply.text
    return Loop(service, clinic, a, b, _patient_of(reply))


def _one_task(loop: Loop, party: Party) -> dict[str, Any]:
    tasks = loop.worklist(party)
    assert len(tasks) == 1, tasks
    return tasks[0]


def _rows(loop: Loop, statement: str) -> list[Any]:
    engine = sa.create_engine(sync_url(loop.service.settings.database_url))
    try:
        with engine.connect() as connection:
            return list(connection.execute(sa.text(statement)))
    finally:
        engine.dispose()


def test_no_task_without_disclosure_and_one_task_per_exam_and_authority(loop: Loop) -> None:
    assert loop.worklist(loop.a) == []
    assert loop.worklist(loop.clinic) == []
    loop.post_consent(loop.a.organization_id)
    task = _one_task(loop, loop.a)
    assert task["status"] == "requested"
    assert task["intent"] == "order"
    assert task["for"] == {"reference": f"Patient/{loop.patient}"}
    assert task["owner"] == {"reference": f"Organization/{loop.a.organization_id}"}
    assert task["requester"] == {"reference": f"Organization/{loop.clinic.organization_id}"}
    assert task["focus"]["reference"].startswith("Observation/")
    # B1 pulmonary is urgent: due 14 days after creation, before the arrival is known.
    assert task["restriction"]["period"]["end"] == (datetime.now(UTC).date() + timedelta(days=14)).isoformat()
    # A second Consent for the same authority discloses the same exam: still one task.
    loop.post_consent(loop.a.organization_id, start=-10)
    assert len(loop.worklist(loop.a)) == 1
    assert loop.worklist(loop.b) == []  # B is admitted to nothing
    stored = _rows(loop, "SELECT status, owner_org, requester_org FROM followup_tasks")
    assert [tuple(r) for r in stored] == [("requested", loop.a.organization_id, loop.clinic.organization_id)]


def test_an_exam_without_follow_up_class_makes_no_task(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    a = service.register("authority A", "authority", purposes=("PUBHLTH",))
    reply = submit(service, clinic, load_example(NORMAL_EXAMPLE))
    loop = Loop(service, clinic, a, a, _patient_of(reply))
    loop.post_consent(a.organization_id)
    assert loop.worklist(a) == []


def test_every_authority_transition_and_refusal(loop: Loop) -> None:
    loop.post_consent(loop.a.organization_id)
    task_id = _one_task(loop, loop.a)["id"]
    refused = loop.op(loop.a, task_id, "progress", status="completed")
    assert refused.status_code == 409
    assert "from 'requested' to 'completed'" in refused.json()["issue"][0]["diagnostics"]
    assert loop.op(loop.a, task_id, "progress", status="cancelled").status_code == 422
    assert loop.op(loop.a, task_id, "progress", status="done").status_code == 422
    assert loop.op(loop.a, task_id, "progress", status="accepted").json()["status"] == "accepted"
    arrival = datetime.now(UTC).date() - timedelta(days=2)
    dated = loop.op(loop.a, task_id, "progress", status="in-progress", arrivalDate=arrival.isoformat())
    assert dated.status_code == 200, dated.text
    body = dated.json()
    assert body["status"] == "in-progress"
    assert body["input"][0]["valueDate"] == arrival.isoformat()
    assert body["restriction"]["period"]["end"] == (arrival + timedelta(days=14)).isoformat()
    future = (datetime.now(UTC).date() + timedelta(days=3)).isoformat()
    assert loop.op(loop.a, task_id, "progress", arrivalDate=future).status_code == 422
    assert loop.op(loop.a, task_id, "progress", status="failed").status_code == 422  # no reason
    assert loop.op(loop.a, task_id, "progress", status="failed", businessStatus="bored").status_code == 422
    failed = loop.op(loop.a, task_id, "progress", status="failed", businessStatus="lost-to-follow-up")
    assert failed.status_code == 200, failed.text
    assert failed.json()["businessStatus"]["coding"][0]["code"] == "lost-to-follow-up"
    again = loop.op(loop.a, task_id, "progress", status="in-progress")
    assert again.status_code == 409
    # Every version is kept, encrypted: requested, accepted, in-progress, failed.
    versions = _rows(loop, f"SELECT version_id FROM resource_versions WHERE id = '{task_id}'")
    assert sorted(v[0] for v in versions) == [1, 2, 3, 4]


def test_completed_and_the_clinic_sees_the_status_but_cannot_change_it(loop: Loop) -> None:
    loop.post_consent(loop.a.organization_id)
    task_id = _one_task(loop, loop.a)["id"]
    for status in ("accepted", "in-progress", "completed"):
        assert loop.op(loop.a, task_id, "progress", status=status).status_code == 200
    seen = loop.get(loop.clinic, f"/fhir/Task/{task_id}")
    assert seen.status_code == 200
    assert seen.json()["status"] == "completed"
    assert [t["id"] for t in loop.worklist(loop.clinic, status="completed")] == [task_id]
    assert loop.op(loop.clinic, task_id, "progress", status="accepted").status_code == 403


def test_another_authority_neither_sees_nor_moves_the_task(loop: Loop) -> None:
    loop.post_consent(loop.a.organization_id)
    loop.post_consent(loop.b.organization_id)  # B admitted too: the exam's case stays A's
    a_task = _one_task(loop, loop.a)["id"]
    assert loop.worklist(loop.b) == []
    assert loop.get(loop.b, f"/fhir/Task/{a_task}").status_code == 404
    assert loop.op(loop.b, a_task, "progress", status="accepted").status_code == 404
    assert loop.op(loop.b, a_task, "transfer", to=loop.b.organization_id).status_code == 404
    assert loop.worklist(loop.b, owner=f"Organization/{loop.a.organization_id}") == []
    other_clinic = loop.service.register("other clinic", "clinic")
    assert loop.get(other_clinic, f"/fhir/Task/{a_task}").status_code == 404
    assert loop.worklist(other_clinic) == []


def test_after_a_withdrawal_a_newly_admitted_authority_gets_the_case(loop: Loop) -> None:
    consent_id = loop.post_consent(loop.a.organization_id)
    first = _one_task(loop, loop.a)["id"]
    loop.withdraw(consent_id)
    loop.post_consent(loop.b.organization_id)
    second = _one_task(loop, loop.b)["id"]
    assert second != first
    loop.post_consent(loop.a.organization_id)  # A again: it sees its old task, still cancelled
    assert [(t["id"], t["status"]) for t in loop.worklist(loop.a)] == [(first, "cancelled")]


def test_withdrawal_cancels_the_task_and_hides_it(loop: Loop) -> None:
    consent_id = loop.post_consent(loop.a.organization_id)
    task_id = _one_task(loop, loop.a)["id"]
    assert loop.op(loop.a, task_id, "progress", status="accepted").status_code == 200
    loop.withdraw(consent_id)
    assert loop.worklist(loop.a) == []
    assert loop.get(loop.a, f"/fhir/Task/{task_id}").status_code == 404
    assert loop.op(loop.a, task_id, "progress", status="in-progress").status_code == 404
    seen = loop.get(loop.clinic, f"/fhir/Task/{task_id}").json()
    assert seen["status"] == "cancelled"
    assert seen["businessStatus"]["coding"][0]["code"] == "consent-withdrawn"


def test_transfer_refused_without_consent_then_accepted(loop: Loop) -> None:
    loop.post_consent(loop.a.organization_id)
    task_id = _one_task(loop, loop.a)["id"]
    refused = loop.op(loop.a, task_id, "transfer", to=loop.b.organization_id)
    assert refused.status_code == 422
    assert "does not admit the new authority" in refused.json()["issue"][0]["diagnostics"]
    assert loop.op(loop.a, task_id, "transfer", to=loop.clinic.organization_id).status_code == 422
    assert loop.op(loop.a, task_id, "transfer", to="no-such-org").status_code == 422
    # Once the migrant's consent admits B, A's case can be handed over.
    loop.post_consent(loop.b.organization_id)
    assert loop.worklist(loop.b) == []
    moved = loop.op(loop.a, task_id, "transfer", to=loop.b.organization_id)
    assert moved.status_code == 200, moved.text
    task = moved.json()["parameter"][0]["resource"]
    assert task["owner"] == {"reference": f"Organization/{loop.b.organization_id}"}
    assert task["status"] == "requested"
    assert [t["id"] for t in loop.worklist(loop.b)] == [task_id]
    assert loop.get(loop.a, f"/fhir/Task/{task_id}").status_code == 404  # A lost it
    transfers = _rows(loop, "SELECT task_id, from_org, to_org FROM followup_transfers")
    assert [tuple(r) for r in transfers] == [(task_id, loop.a.organization_id, loop.b.organization_id)]
    assigned = _rows(loop, "SELECT count(*) FROM audit_entries WHERE subtype = 'task-assigned'")
    assert assigned[0][0] == 2  # A's task, then the transfer to B


def test_worklist_filters_and_paging(loop: Loop) -> None:
    loop.post_consent(loop.a.organization_id)
    other = submit(loop.service, loop.clinic, load_example(B2_EXAMPLE))  # B2: due in 30 days
    second = Loop(loop.service, loop.clinic, loop.a, loop.b, _patient_of(other))
    second.post_consent(loop.a.organization_id)
    tasks = loop.worklist(loop.a)
    assert len(tasks) == 2
    first_id = next(t["id"] for t in tasks if t["for"]["reference"] == f"Patient/{loop.patient}")
    assert loop.op(loop.a, first_id, "progress", status="accepted").status_code == 200
    assert [t["id"] for t in loop.worklist(loop.a, status="accepted")] == [first_id]
    assert len(loop.worklist(loop.a, status="requested,accepted")) == 2
    assert [t["id"] for t in loop.worklist(loop.a, patient=f"Patient/{loop.patient}")] == [first_id]
    today = datetime.now(UTC).date()
    assert [
        t["id"] for t in loop.worklist(loop.a, period=f"le{(today + timedelta(days=14)).isoformat()}")
    ] == [first_id]
    assert len(loop.worklist(loop.a, period=f"le{(today + timedelta(days=30)).isoformat()}")) == 2
    assert loop.worklist(loop.a, period=f"le{today.isoformat()}") == []
    assert len(loop.worklist(loop.a, code="tb-followup")) == 2
    page = loop.get(loop.a, "/fhir/Task", _count="1").json()
    assert page["total"] == 2 and len(page["entry"]) == 1
    next_url = next(link["url"] for link in page["link"] if link["relation"] == "next")
    assert next_url.startswith(loop.service.settings.fhir_base_url)
    assert loop.get(loop.a, "/fhir/Task", period="yesterday").status_code == 400
    assert loop.get(loop.a, "/fhir/Task", colour="red").status_code == 400


def test_overdue_is_raised_once_per_due_date(loop: Loop) -> None:
    loop.post_consent(loop.a.organization_id)
    task_id = _one_task(loop, loop.a)["id"]

    async def run(today: date) -> int:
        database = Database(loop.service.settings.database_url)
        try:
            async with database.transaction() as session:
                return await mark_overdue(RecordRepository(session), today)
        finally:
            await database.dispose()

    today = datetime.now(UTC).date()
    assert asyncio.run(run(today)) == 0  # not yet due
    assert asyncio.run(run(today + timedelta(days=30))) == 1
    assert asyncio.run(run(today + timedelta(days=31))) == 0  # raised once
    events = _rows(loop, "SELECT count(*) FROM audit_entries WHERE subtype = 'task-overdue'")
    assert events[0][0] == 1
    # Recording the arrival re-dates the task, and a new due date is raised again once past.
    arrival = (today - timedelta(days=1)).isoformat()
    assert loop.op(loop.a, task_id, "progress", status="accepted", arrivalDate=arrival).status_code == 200
    assert asyncio.run(run(today + timedelta(days=30))) == 1


WS = "https://mhr.example.org/fhir/CodeSystem/followup-worksheet"


def worksheet(loop: Loop, task_id: str, *, share: bool = True, **changes: Any) -> dict[str, Any]:
    today = datetime.now(UTC).date()
    answers: dict[str, Any] = {
        "arrival-date": {"valueDate": (today - timedelta(days=5)).isoformat()},
        "evaluation-date": {"valueDate": (today - timedelta(days=1)).isoformat()},
        "igra": {"valueCoding": {"system": WS, "code": "positive"}},
        "tst": {"valueCoding": {"system": WS, "code": "not-done"}},
        "chest-xray": {"valueCoding": {"system": WS, "code": "abnormal-tb"}},
        "diagnosis": {"valueCoding": {"system": WS, "code": "active-tb"}},
        "classification-outcome": {"valueCoding": {"system": WS, "code": "confirmed"}},
        "treatment-started": {"valueBoolean": True},
        "share-with-examining-clinic": {"valueBoolean": share},
    }
    for link, answer in changes.items():
        if answer is None:
            answers.pop(link.replace("_", "-"))
        else:
            answers[link.replace("_", "-")] = answer
    return {
        "resourceType": "QuestionnaireResponse",
        "questionnaire": "https://mhr.example.org/fhir/Questionnaire/tb-followup-worksheet",
        "status": "completed",
        "basedOn": [{"reference": f"Task/{task_id}"}],
        "subject": {"reference": f"Patient/{loop.patient}"},
        "item": [{"linkId": k, "answer": [v]} for k, v in answers.items()],
    }


def _report(loop: Loop, party: Party, body: dict[str, Any]) -> Any:
    return loop.service.client.post(
        "/fhir/QuestionnaireResponse",
        content=json.dumps(body),
        headers={**FHIR_HEADERS, **loop.service.headers(party)},
    )


def _in_progress(loop: Loop) -> str:
    loop.post_consent(loop.a.organization_id)
    task_id = str(_one_task(loop, loop.a)["id"])
    for status in ("accepted", "in-progress"):
        assert loop.op(loop.a, task_id, "progress", status=status).status_code == 200
    return task_id


def test_the_worksheet_completes_the_task_and_the_clinic_reads_it_where_shared(loop: Loop) -> None:
    task_id = _in_progress(loop)
    reply = _report(loop, loop.a, worksheet(loop, task_id))
    assert reply.status_code == 201, reply.text
    response_id = reply.json()["id"]
    assert reply.json()["author"] == {"reference": f"Organization/{loop.a.organization_id}"}
    task = loop.get(loop.clinic, f"/fhir/Task/{task_id}").json()
    assert task["status"] == "completed"
    assert task["output"][0]["valueReference"] == {"reference": f"QuestionnaireResponse/{response_id}"}
    shared = loop.get(loop.clinic, f"/fhir/QuestionnaireResponse/{response_id}")
    assert shared.status_code == 200
    assert shared.json()["basedOn"] == [{"reference": f"Task/{task_id}"}]
    assert loop.get(loop.a, f"/fhir/QuestionnaireResponse/{response_id}").status_code == 200
    assert loop.get(loop.b, f"/fhir/QuestionnaireResponse/{response_id}").status_code == 404
    row = _rows(loop, "SELECT outcome, evaluated_on, arrival_date, outcome_shared FROM followup_tasks")[0]
    assert row[0] == "confirmed"
    assert str(row[1]) == (datetime.now(UTC).date() - timedelta(days=1)).isoformat()
    stored = _rows(loop, f"SELECT ciphertext FROM resource_versions WHERE id = '{response_id}'")
    assert b"active-tb" not in bytes(stored[0][0])  # encrypted under the migrant's key
    # A second worksheet for a completed task is refused.
    assert _report(loop, loop.a, worksheet(loop, task_id)).status_code == 409


def test_an_unshared_worksheet_stays_with_the_authority(loop: Loop) -> None:
    task_id = _in_progress(loop)
    reply = _report(loop, loop.a, worksheet(loop, task_id, share=False))
    assert reply.status_code == 201, reply.text
    task = loop.get(loop.clinic, f"/fhir/Task/{task_id}").json()
    assert task["status"] == "completed"
    assert "output" not in task
    assert loop.get(loop.clinic, f"/fhir/QuestionnaireResponse/{reply.json()['id']}").status_code == 404


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"diagnosis": None}, "'diagnosis' is required"),
        (
            {"igra": {"valueCoding": {"system": WS, "code": "purple"}}},
            "'igra' needs one of its answer options",
        ),
        ({"treatment_started": {"valueString": "yes"}}, "'treatment-started' takes a boolean"),
        ({"evaluation_date": {"valueDate": "2020-01-01"}}, "cannot precede the arrival"),
        ({"colour": {"valueBoolean": True}}, "'colour' is not in the worksheet"),
    ],
)
def test_an_invalid_worksheet_is_refused_and_nothing_is_written(
    loop: Loop, changes: dict[str, Any], named: str
) -> None:
    task_id = _in_progress(loop)
    reply = _report(loop, loop.a, worksheet(loop, task_id, **changes))
    assert reply.status_code == 422, reply.text
    assert named in reply.json()["issue"][0]["diagnostics"]
    assert loop.get(loop.a, f"/fhir/Task/{task_id}").json()["status"] == "in-progress"
    assert (
        _rows(loop, "SELECT count(*) FROM resources WHERE resource_type = 'QuestionnaireResponse'")[0][0] == 0
    )


def test_only_the_owner_reports_and_only_for_a_task_in_progress(loop: Loop) -> None:
    loop.post_consent(loop.a.organization_id)
    task_id = str(_one_task(loop, loop.a)["id"])
    assert _report(loop, loop.a, worksheet(loop, task_id)).status_code == 409  # still requested
    assert _report(loop, loop.b, worksheet(loop, task_id)).status_code == 404
    assert _report(loop, loop.clinic, worksheet(loop, task_id)).status_code == 403
    unnamed = worksheet(loop, task_id)
    unnamed.pop("basedOn")
    assert _report(loop, loop.a, unnamed).status_code == 422


def test_a_sweep_is_queued_for_the_day_after_each_due_date(loop: Loop) -> None:
    loop.post_consent(loop.a.organization_id)
    task_id = _one_task(loop, loop.a)["id"]
    due = datetime.now(UTC).date() + timedelta(days=14)
    arrival = datetime.now(UTC).date() - timedelta(days=3)
    assert loop.op(loop.a, task_id, "progress", arrivalDate=arrival.isoformat()).status_code == 200
    jobs = _rows(loop, "SELECT idempotency_key, state FROM jobs WHERE kind = 'tasks.overdue' ORDER BY id")
    assert [tuple(j) for j in jobs] == [
        (f"overdue:{(due + timedelta(days=1)).isoformat()}", "queued"),
        (f"overdue:{(arrival + timedelta(days=15)).isoformat()}", "queued"),
    ]


def test_validate_checks_a_worksheet_without_storing_it(loop: Loop) -> None:
    task_id = _in_progress(loop)
    headers = {**FHIR_HEADERS, **loop.service.headers(loop.a)}
    url = "/fhir/QuestionnaireResponse/$validate"
    good = loop.service.client.post(url, content=json.dumps(worksheet(loop, task_id)), headers=headers)
    assert good.status_code == 200, good.text
    bad = loop.service.client.post(
        url, content=json.dumps(worksheet(loop, task_id, tst=None)), headers=headers
    )
    assert bad.status_code == 422
    assert loop.get(loop.a, f"/fhir/Task/{task_id}").json()["status"] == "in-progress"
    assert (
        _rows(loop, "SELECT count(*) FROM resources WHERE resource_type = 'QuestionnaireResponse'")[0][0] == 0
    )


def test_an_erased_migrant_leaves_no_task_in_any_worklist(loop: Loop) -> None:
    loop.post_consent(loop.a.organization_id)
    task_id = _one_task(loop, loop.a)["id"]
    admins = loop.service.register("admin A", "admin"), loop.service.register("admin B", "admin")

    def post(party: Party, path: str, body: dict[str, Any] | None = None) -> Any:
        return loop.service.client.post(
            path,
            content=json.dumps(body) if body is not None else None,
            headers={**FHIR_HEADERS, **loop.service.headers(party)},
        )

    asked = post(
        admins[0], "/admin/erasures", {"patient": f"Patient/{loop.patient}", "reason": "gdpr-art17-1b"}
    )
    assert asked.status_code == 201, asked.text
    assert post(admins[1], f"/admin/erasures/{asked.json()['id']}/approve").status_code == 200
    assert loop.worklist(loop.clinic) == []
    assert loop.worklist(loop.a) == []
    assert loop.get(loop.a, f"/fhir/Task/{task_id}").status_code == 404
    assert loop.get(loop.clinic, f"/fhir/Task/{task_id}").status_code == 410

    async def sweep() -> int:
        database = Database(loop.service.settings.database_url)
        try:
            async with database.transaction() as session:
                return await mark_overdue(
                    RecordRepository(session), datetime.now(UTC).date() + timedelta(days=60)
                )
        finally:
            await database.dispose()

    assert asyncio.run(sweep()) == 0


def test_a_relabel_that_discloses_the_classification_opens_the_case(loop: Loop) -> None:
    """Observations labelled before labels were kept per version (no token: they fail closed)
    disclose nothing, so a consent makes no task; ``mhr records relabel`` gives them their
    tokens, the classification is disclosed, and the task follows in the relabel's transaction."""
    engine = sa.create_engine(sync_url(loop.service.settings.database_url))
    try:
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "UPDATE resource_versions SET labels_token = NULL WHERE resource_type = 'Observation'"
                    " AND subject_id = (SELECT subject_id FROM resources WHERE resource_type = 'Patient'"
                    " AND id = :p)"
                ),
                {"p": loop.patient},
            )
    finally:
        engine.dispose()
    loop.post_consent(loop.a.organization_id)
    assert loop.worklist(loop.a) == []
    runtime = loop.service.fastapi.state.runtime  # type: ignore[attr-defined]

    async def run(db: Database) -> RelabelCounts:
        return await relabel(db, runtime.records)

    assert loop.service._run(run).changed > 0
    task = _one_task(loop, loop.a)
    assert task["status"] == "requested" and task["focus"]["reference"].startswith("Observation/")
    assert loop.worklist(loop.b) == []

"""Retrying a write is safe: a resubmitted exam, an Idempotency-Key, conditional create by identifier."""

from __future__ import annotations

import copy
import json
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from mhr_testkit import EXAMPLES, FHIR_HEADERS, Party, Service, load_example, submit, sync_url

REFUGEE = next(p for p in EXAMPLES if p.stem == "exam-refugee-vaccinations")
OBSERVATION_SYSTEM = "https://amman-clinic.example.org/fhir/sid/observation"


@pytest.fixture
def clinic(service: Service) -> Party:
    return service.register("clinic", "clinic")


def _count(database_url: str, sql: str) -> int:
    engine = sa.create_engine(sync_url(database_url))
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(sql)).scalar_one())
    finally:
        engine.dispose()


def _stored(database_url: str) -> tuple[int, int]:
    return (
        _count(database_url, "SELECT count(*) FROM resources"),
        _count(database_url, "SELECT count(*) FROM resource_versions"),
    )


def _audit_details(database_url: str) -> list[dict[str, Any]]:
    engine = sa.create_engine(sync_url(database_url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT content FROM audit_entries ORDER BY id")).scalars().all()
    finally:
        engine.dispose()
    return [json.loads(bytes(r) if not isinstance(r, str) else r) for r in rows]


def _patient_id(service: Service, clinic: Party) -> str:
    reply = submit(service, clinic, load_example(EXAMPLES[0]))
    assert reply.status_code == 200, reply.text
    location = next(
        e["response"]["location"]
        for e in reply.json()["entry"]
        if e["response"]["location"].startswith("Patient/")
    )
    return str(location.split("/")[1])


def _observation(patient_id: str, value: str | None = None) -> dict[str, Any]:
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8302-2", "display": "Body height"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": "2025-03-06T09:30:00Z",
        "valueQuantity": {"value": 172, "unit": "cm", "system": "http://unitsofmeasure.org", "code": "cm"},
    }
    if value is not None:
        observation["identifier"] = [{"system": OBSERVATION_SYSTEM, "value": value}]
    return observation


def _post(service: Service, clinic: Party, path: str, body: Any, **headers: str) -> Any:
    return service.client.post(
        path, content=json.dumps(body), headers={**FHIR_HEADERS, **service.headers(clinic), **headers}
    )


# --- a whole exam ---------------------------------------------------------------------------
def test_resubmitting_an_exam_answers_as_the_first_time_and_stores_nothing(
    service: Service, clinic: Party, database_url: str
) -> None:
    bundle = load_example(REFUGEE)
    first = submit(service, clinic, bundle)
    assert first.status_code == 200, first.text
    stored = _stored(database_url)
    consents = _count(database_url, "SELECT count(*) FROM resources WHERE resource_type = 'Consent'")
    # The clinic system timed out and sends the very same Bundle again (keys reordered, too).
    again = service.client.post(
        "/fhir",
        content=json.dumps(dict(reversed(list(bundle.items())))),
        headers={**FHIR_HEADERS, **service.headers(clinic)},
    )
    assert again.status_code == 200, again.text
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert all(e["response"]["status"] == "201 Created" for e in again.json()["entry"])
    assert _stored(database_url) == stored
    assert (
        _count(database_url, "SELECT count(*) FROM resources WHERE resource_type = 'Consent'")
        == consents
        == 1
    )
    # The retry is on the audit record, naming what it answered with.
    replay = _audit_details(database_url)[-1]
    assert replay["subtype"] == "transaction" and replay["detail"] == "replay"
    assert len(replay["entities"]) == len(first.json()["entry"])


def test_a_different_exam_under_a_used_bundle_identifier_is_refused(
    service: Service, clinic: Party, database_url: str
) -> None:
    bundle = load_example(REFUGEE)
    assert submit(service, clinic, bundle).status_code == 200
    stored = _stored(database_url)
    changed = copy.deepcopy(bundle)
    changed["timestamp"] = "2025-03-07T10:00:00+03:00"
    refused = submit(service, clinic, changed)
    assert refused.status_code == 409, refused.text
    assert refused.json()["resourceType"] == "OperationOutcome"
    assert "Bundle.identifier" in refused.json()["issue"][0]["diagnostics"]
    assert _stored(database_url) == stored


def test_bundle_identifiers_are_scoped_to_the_clinic(
    service: Service, clinic: Party, database_url: str
) -> None:
    other = service.register("clinic", "clinic")
    bundle = load_example(REFUGEE)
    assert submit(service, clinic, bundle).status_code == 200
    stored = _stored(database_url)
    theirs = submit(service, other, bundle)  # another clinic's identically numbered exam
    assert theirs.status_code == 200, theirs.text
    assert "idempotent-replayed" not in theirs.headers
    assert _stored(database_url)[0] > stored[0]


# --- Idempotency-Key --------------------------------------------------------------------------
def test_an_idempotency_key_replays_a_create_with_its_status_headers_and_body(
    service: Service, clinic: Party, database_url: str
) -> None:
    patient = _patient_id(service, clinic)
    before = _stored(database_url)
    key = str(uuid.uuid4())
    first = _post(service, clinic, "/fhir/Observation", _observation(patient), **{"Idempotency-Key": key})
    assert first.status_code == 201, first.text
    again = _post(service, clinic, "/fhir/Observation", _observation(patient), **{"Idempotency-Key": key})
    assert again.status_code == 201, again.text
    assert again.content == first.content
    for header in ("location", "etag", "last-modified"):
        assert again.headers[header] == first.headers[header]
    assert again.headers["idempotent-replayed"] == "true"
    # One Observation and its Provenance: nothing from the retry.
    assert _stored(database_url) == (before[0] + 2, before[1] + 2)


def test_an_idempotency_key_reused_for_another_request_is_refused(
    service: Service, clinic: Party, database_url: str
) -> None:
    patient = _patient_id(service, clinic)
    key = "order-4711"
    assert (
        _post(
            service, clinic, "/fhir/Observation", _observation(patient), **{"Idempotency-Key": key}
        ).status_code
        == 201
    )
    stored = _stored(database_url)
    other = _observation(patient)
    other["valueQuantity"]["value"] = 180
    refused = _post(service, clinic, "/fhir/Observation", other, **{"Idempotency-Key": key})
    assert refused.status_code == 422, refused.text
    assert "Idempotency-Key" in refused.json()["issue"][0]["diagnostics"]
    # The same key on another path is another request too.
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": []}
    assert _post(service, clinic, "/fhir", bundle, **{"Idempotency-Key": key}).status_code == 422
    assert _stored(database_url) == stored


def test_idempotency_keys_are_scoped_to_the_client(
    service: Service, clinic: Party, database_url: str
) -> None:
    other = service.register("other clinic", "clinic")
    mine, theirs = _patient_id(service, clinic), _patient_id(service, other)
    key = "same-key"
    first = _post(service, clinic, "/fhir/Observation", _observation(mine), **{"Idempotency-Key": key})
    # Another client's key is its own: a different body under it is no mismatch, and no replay.
    second = _post(service, other, "/fhir/Observation", _observation(theirs), **{"Idempotency-Key": key})
    assert first.status_code == second.status_code == 201, second.text
    assert "idempotent-replayed" not in second.headers


def test_an_expired_idempotency_key_is_forgotten(service: Service, clinic: Party, database_url: str) -> None:
    patient = _patient_id(service, clinic)
    key = "expiring"
    first = _post(service, clinic, "/fhir/Observation", _observation(patient), **{"Idempotency-Key": key})
    engine = sa.create_engine(sync_url(database_url))
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE idempotent_requests SET expires_at = :past WHERE expires_at IS NOT NULL"),
            {"past": "2000-01-01T00:00:00+00:00"},
        )
    engine.dispose()
    later = _post(service, clinic, "/fhir/Observation", _observation(patient), **{"Idempotency-Key": key})
    assert later.status_code == 201
    assert later.headers["location"] != first.headers["location"]
    assert "idempotent-replayed" not in later.headers


def test_an_idempotency_key_replays_a_transaction_and_an_update(
    service: Service, clinic: Party, database_url: str
) -> None:
    bundle = load_example(EXAMPLES[1])
    del bundle["identifier"]  # only the header makes this retry safe
    first = _post(service, clinic, "/fhir", bundle, **{"Idempotency-Key": "exam-1"})
    assert first.status_code == 200, first.text
    stored = _stored(database_url)
    again = _post(service, clinic, "/fhir", bundle, **{"Idempotency-Key": "exam-1"})
    assert again.json() == first.json()
    assert _stored(database_url) == stored
    location = next(
        e["response"]["location"]
        for e in first.json()["entry"]
        if e["response"]["location"].startswith("Patient/")
    )
    patient_id = location.split("/")[1]
    headers = {**FHIR_HEADERS, **service.headers(clinic), "Idempotency-Key": "fix-name"}
    current = service.client.get(f"/fhir/Patient/{patient_id}", headers=service.headers(clinic)).json()
    current["gender"] = "female" if current.get("gender") != "female" else "male"
    put = [
        service.client.put(f"/fhir/Patient/{patient_id}", content=json.dumps(current), headers=headers)
        for _ in range(2)
    ]
    assert [r.status_code for r in put] == [200, 200]
    assert put[0].content == put[1].content and put[0].headers["etag"] == put[1].headers["etag"] == 'W/"2"'


@pytest.mark.parametrize("bad", [b"", b"x" * 256, "caf\u00e9".encode(), b"tab\there"])
def test_a_malformed_idempotency_key_is_a_clear_400(service: Service, clinic: Party, bad: bytes) -> None:
    patient = _patient_id(service, clinic)
    response = service.client.post(
        "/fhir/Observation",
        content=json.dumps(_observation(patient)),
        headers={
            **FHIR_HEADERS,
            **service.headers(clinic),
            "Idempotency-Key": bad,
        },
    )
    assert response.status_code == 400, response.text
    assert response.json()["resourceType"] == "OperationOutcome"


# --- conditional create by identifier on every type -------------------------------------------
def test_conditional_create_by_identifier_works_for_an_observation(
    service: Service, clinic: Party, database_url: str
) -> None:
    patient = _patient_id(service, clinic)
    condition = {"If-None-Exist": f"identifier={OBSERVATION_SYSTEM}|OBS-1"}
    first = _post(service, clinic, "/fhir/Observation", _observation(patient, "OBS-1"), **condition)
    assert first.status_code == 201, first.text
    stored = _stored(database_url)
    again = _post(service, clinic, "/fhir/Observation", _observation(patient, "OBS-1"), **condition)
    assert again.status_code == 200, again.text
    assert again.headers["location"] == first.headers["location"]
    assert again.json()["id"] == first.json()["id"]
    assert _stored(database_url) == stored
    # ... and the identifier is searchable, so a clinic can also look before it sends.
    found = service.client.post(
        "/fhir/Observation/_search",
        data={"identifier": f"{OBSERVATION_SYSTEM}|OBS-1"},
        headers=service.headers(clinic),
    ).json()
    assert found["total"] == 1 and found["entry"][0]["resource"]["id"] == first.json()["id"]


def test_transaction_entries_of_every_type_take_if_none_exist(
    service: Service, clinic: Party, database_url: str
) -> None:
    patient = _patient_id(service, clinic)
    entry = {
        "fullUrl": f"urn:uuid:{uuid.uuid4()}",
        "resource": _observation(patient, "OBS-2"),
        "request": {
            "method": "POST",
            "url": "Observation",
            "ifNoneExist": f"identifier={OBSERVATION_SYSTEM}|OBS-2",
        },
    }
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
    first = submit(service, clinic, bundle)
    assert first.status_code == 200, first.text
    assert first.json()["entry"][0]["response"]["status"] == "201 Created"
    stored = _stored(database_url)
    second = submit(service, clinic, bundle)
    assert second.json()["entry"][0]["response"]["status"] == "200 OK"
    assert (
        second.json()["entry"][0]["response"]["location"] == first.json()["entry"][0]["response"]["location"]
    )
    assert _stored(database_url) == stored


# --- $validate ---------------------------------------------------------------------------------
def test_validate_runs_a_writes_checks_and_stores_nothing(
    service: Service, clinic: Party, database_url: str
) -> None:
    patient = _patient_id(service, clinic)
    stored = _stored(database_url)
    valid = _post(service, clinic, "/fhir/Observation/$validate", _observation(patient))
    assert valid.status_code == 200, valid.text
    assert valid.json()["resourceType"] == "OperationOutcome"
    assert valid.json()["issue"][0]["severity"] == "information"
    # The same checks as a create, with the same OperationOutcome and status.
    dangling = _observation("no-such-patient")
    checked = _post(service, clinic, "/fhir/Observation/$validate", dangling)
    written = _post(service, clinic, "/fhir/Observation", dangling)
    assert checked.status_code == written.status_code != 200
    assert checked.json() == written.json()
    broken = _observation(patient)
    broken["status"] = 7
    checked = _post(service, clinic, "/fhir/Observation/$validate", broken)
    written = _post(service, clinic, "/fhir/Observation", broken)
    assert checked.status_code == written.status_code and checked.status_code in (400, 422)
    assert checked.json() == written.json()
    # Parameters with a resource part is accepted as well.
    wrapped = {
        "resourceType": "Parameters",
        "parameter": [{"name": "resource", "resource": _observation(patient)}],
    }
    assert _post(service, clinic, "/fhir/Observation/$validate", wrapped).status_code == 200
    assert _stored(database_url) == stored
    validations = [a for a in _audit_details(database_url) if a["subtype"] == "Observation.validate"]
    assert len(validations) == 4


def test_validate_a_whole_exam(service: Service, clinic: Party, database_url: str) -> None:
    bundle = load_example(REFUGEE)
    valid = _post(service, clinic, "/fhir/Bundle/$validate", bundle)
    assert valid.status_code == 200, valid.text
    assert _stored(database_url) == (0, 0)
    assert _count(database_url, "SELECT count(*) FROM idempotent_requests") == 0
    broken = copy.deepcopy(bundle)
    broken["entry"][1]["resource"]["subject"] = {"reference": "Patient/nobody"}
    checked = _post(service, clinic, "/fhir/Bundle/$validate", broken)
    written = submit(service, clinic, broken)
    assert checked.status_code == written.status_code != 200
    assert checked.json() == written.json()
    assert _stored(database_url) == (0, 0)
    # Clinics only: an authority may not probe the intake.
    authority = service.register("authority", "authority", purposes=("PUBHLTH",))
    refused = _post(service, authority, "/fhir/Bundle/$validate", bundle)
    assert refused.status_code == 403

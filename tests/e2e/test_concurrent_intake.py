"""ifNoneExist under concurrency: the same migrant submitted at once by many clients is stored once."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
from e2e_helpers import LiveServer
from mhr_testkit import EXAMPLES, FHIR_HEADERS, load_example

SUBMITTERS = 8


def test_concurrent_resubmissions_store_one_patient(live_server: LiveServer) -> None:
    clinic = live_server.registry.register("clinic", "clinic")
    token = live_server.token(clinic)
    bundle = load_example(EXAMPLES[0])
    del bundle["identifier"]  # separate exams of one migrant: only ifNoneExist keeps one Patient
    headers = {**FHIR_HEADERS, "Authorization": f"Bearer {token}"}

    def submit(_: int) -> httpx.Response:
        return httpx.post(live_server.fhir_url, content=json.dumps(bundle), headers=headers, timeout=60)

    with ThreadPoolExecutor(SUBMITTERS) as pool:
        responses = list(pool.map(submit, range(SUBMITTERS)))
    assert [r.status_code for r in responses] == [200] * SUBMITTERS, [r.text[:300] for r in responses]
    patient_ids = {r.json()["entry"][0]["response"]["location"].split("/")[1] for r in responses}
    assert len(patient_ids) == 1
    created = [r.json()["entry"][0]["response"]["status"] for r in responses]
    assert created.count("201 Created") == 1
    patient = bundle["entry"][0]["resource"]
    passport = patient["identifier"][0]
    found = httpx.post(
        f"{live_server.fhir_url}/Patient/_search",
        data={"identifier": f"{passport['system']}|{passport['value']}"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    ).json()
    assert found["total"] == 1


def test_concurrent_copies_of_one_exam_store_it_once_and_answer_alike(live_server: LiveServer) -> None:
    """An operator's double click, or a retry racing the first attempt: the same Bundle.identifier."""
    clinic = live_server.registry.register("clinic", "clinic")
    token = live_server.token(clinic)
    bundle = load_example(EXAMPLES[1])
    headers = {**FHIR_HEADERS, "Authorization": f"Bearer {token}"}

    def submit(_: int) -> httpx.Response:
        return httpx.post(live_server.fhir_url, content=json.dumps(bundle), headers=headers, timeout=60)

    with ThreadPoolExecutor(SUBMITTERS) as pool:
        responses = list(pool.map(submit, range(SUBMITTERS)))
    assert [r.status_code for r in responses] == [200] * SUBMITTERS, [r.text[:300] for r in responses]
    assert len({r.content for r in responses}) == 1  # every copy got the first one's answer
    assert sum("idempotent-replayed" not in r.headers for r in responses) == 1
    patient = responses[0].json()["entry"][0]["response"]["location"].split("/")[1]
    everything = httpx.get(
        f"{live_server.fhir_url}/Patient/{patient}/$everything",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    ).json()
    # The exam's entries and one Provenance: stored once.
    assert everything["total"] == len(bundle["entry"]) + 1

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

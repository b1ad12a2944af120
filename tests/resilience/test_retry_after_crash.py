"""A write that committed but never got its answer (the server died in between) is retried safely.

The server runs with the test fault ``MHR_TEST_EXIT_AFTER_COMMITS=1``: it exits like a kill -9
right after committing the first request transaction, before answering it. The clinic's retry,
sent to the restarted server, gets the original answer, and the store holds one copy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mhr_testkit import FHIR_HEADERS, Party, Service, submit
from resilience_kit import REFUGEE_EXAMPLE, ServerProcess, scalar, unique_bundle

pytestmark = [pytest.mark.slow]


@pytest.fixture
def registry(database_url: str, tmp_path: Path) -> Iterator[Service]:
    with Service.start(database_url, tmp_path) as running:
        yield running


@pytest.fixture
def server(database_url: str, tmp_path: Path, registry: Service) -> Iterator[ServerProcess]:
    process = ServerProcess(database_url, tmp_path, extra_env={"MHR_RATE_LIMIT_ENABLED": "false"})
    try:
        yield process
    finally:
        process.stop()


def _token_then_crash_on_next_commit(server: ServerProcess, clinic: Party) -> str:
    """A token from a healthy server (the token endpoint commits too), then a restart with the fault."""
    server.start()
    token = server.token(clinic)
    server.stop()
    server.extra_env["MHR_TEST_EXIT_AFTER_COMMITS"] = "1"
    server.start()
    return token


def _send(server: ServerProcess, path: str, body: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
    return httpx.post(
        f"{server.base_url}{path}",
        content=json.dumps(body),
        headers={**FHIR_HEADERS, **headers},
        timeout=30,
    )


def _lost_answer(server: ServerProcess, path: str, body: dict[str, Any], headers: dict[str, str]) -> None:
    with pytest.raises(httpx.HTTPError):  # the connection closes with no response
        _send(server, path, body, headers)
    assert server.process is not None
    assert server.process.wait(timeout=20) == 70  # it was the fault, after the commit
    server.extra_env.pop("MHR_TEST_EXIT_AFTER_COMMITS")
    server.start()


def test_a_create_committed_without_an_answer_is_retried_with_its_idempotency_key(
    server: ServerProcess, registry: Service, database_url: str
) -> None:
    clinic = registry.register("clinic", "clinic")
    bundle, _ = unique_bundle(REFUGEE_EXAMPLE)
    reply = submit(registry, clinic, bundle)
    assert reply.status_code == 200, reply.text
    patient = next(
        e["response"]["location"].split("/")[1]
        for e in reply.json()["entry"]
        if e["response"]["location"].startswith("Patient/")
    )
    observations = scalar(database_url, "SELECT count(*) FROM resources WHERE resource_type = 'Observation'")
    token = _token_then_crash_on_next_commit(server, clinic)
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7", "display": "Body weight"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": "2025-03-06T09:30:00Z",
        "valueQuantity": {"value": 61, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"},
    }
    headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": "weight-2025-03-06"}
    _lost_answer(server, "/fhir/Observation", observation, headers)
    # The first attempt committed: one new Observation.
    assert scalar(database_url, "SELECT count(*) FROM resources WHERE resource_type = 'Observation'") == (
        observations + 1
    )
    retried = _send(server, "/fhir/Observation", observation, headers)
    assert retried.status_code == 201, retried.text
    assert retried.headers["idempotent-replayed"] == "true"
    stored = httpx.get(retried.headers["location"], headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert stored.status_code == 200
    assert retried.content == stored.content  # the version the first attempt wrote
    assert retried.headers["etag"] == 'W/"1"'
    assert scalar(database_url, "SELECT count(*) FROM resources WHERE resource_type = 'Observation'") == (
        observations + 1
    )


def test_an_exam_committed_without_an_answer_is_resubmitted_by_its_bundle_identifier(
    server: ServerProcess, registry: Service, database_url: str
) -> None:
    clinic = registry.register("clinic", "clinic")
    bundle, _ = unique_bundle(REFUGEE_EXAMPLE)
    token = _token_then_crash_on_next_commit(server, clinic)
    headers = {"Authorization": f"Bearer {token}"}  # no header: the Bundle.identifier is the key
    _lost_answer(server, "/fhir", bundle, headers)
    stored = scalar(database_url, "SELECT count(*) FROM resource_versions")
    consents = scalar(database_url, "SELECT count(*) FROM resources WHERE resource_type = 'Consent'")
    assert stored > len(bundle["entry"]) and consents == 1
    retried = _send(server, "/fhir", bundle, headers)
    assert retried.status_code == 200, retried.text
    entries = retried.json()["entry"]
    assert len(entries) == len(bundle["entry"])
    assert all(e["response"]["status"] == "201 Created" for e in entries)
    for entry in entries:  # every location names what the first attempt stored
        read = httpx.get(
            f"{server.base_url}/fhir/{entry['response']['location']}", headers=headers, timeout=30
        )
        assert read.status_code == 200, entry
    assert scalar(database_url, "SELECT count(*) FROM resource_versions") == stored
    assert scalar(database_url, "SELECT count(*) FROM resources WHERE resource_type = 'Consent'") == 1

"""Work limits on request bodies, at their edges: at the limit a body is stored intact, one past
it is refused with a 413 that names the limit, and nothing is stored. On SQLite and PostgreSQL,
with limits lowered so that the edge is cheap to reach."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from mhr_testkit import EXAMPLES, FHIR_HEADERS, Service, load_example, sync_url

EXT = "https://clinic.example.org/fhir/ext"
LIMITS = {
    "max_json_values": 2_000,
    "max_json_array_items": 300,
    "max_json_depth": 24,
    "max_json_string_chars": 4_096,
    "max_bundle_entries": 20,
}


def _values(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + sum(_values(v) for v in value.values())
    if isinstance(value, list):
        return 1 + sum(_values(v) for v in value)
    return 1


def _depth(value: Any) -> int:
    if isinstance(value, dict) and value:
        return 1 + max(_depth(v) for v in value.values())
    if isinstance(value, list) and value:
        return 1 + max(_depth(v) for v in value)
    return 1


def _example(name: str) -> Path:
    return next(p for p in EXAMPLES if p.stem == name)


def _stored(service: Service) -> int:
    engine = sa.create_engine(sync_url(service.settings.database_url))
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM resource_versions")).scalar_one())
    finally:
        engine.dispose()


@pytest.fixture
def limited(database_url: str, tmp_path: Path) -> Iterator[tuple[Service, dict[str, str], str]]:
    """A service with low work limits, a clinic's headers and one of its migrants."""
    with Service.start(database_url, tmp_path, **LIMITS) as service:
        clinic = service.register("clinic", "clinic")
        headers = {**FHIR_HEADERS, **service.headers(clinic)}
        bundle = load_example(_example("exam-child-igra-b2"))
        reply = service.client.post("/fhir", content=json.dumps(bundle), headers=headers)
        assert reply.status_code == 200, reply.text[:300]
        patient = next(
            e["response"]["location"].split("/")[1]
            for e in reply.json()["entry"]
            if e["response"]["location"].startswith("Patient/")
        )
        yield service, headers, patient


def _observation(patient: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "panel clinic note"},
        "subject": {"reference": f"Patient/{patient}"},
    }


def _with_extensions(patient: str, count: int) -> dict[str, Any]:
    resource = _observation(patient)
    resource["extension"] = [{"url": EXT, "valueString": f"v{i}"} for i in range(count)]
    return resource


def _nested_extensions(patient: str, depth: int) -> dict[str, Any]:
    """An Observation whose extensions nest until the resource is ``depth`` levels deep."""
    # A nesting adds two levels; a leaf with a Coding adds one more than a leaf with a string.
    for leaf in ({"url": "leaf", "valueString": "v"}, {"url": "leaf", "valueCoding": {"code": "v"}}):
        resource = _observation(patient)
        resource["extension"] = [leaf]
        while _depth(resource) < depth:
            resource["extension"] = [{"url": EXT, "extension": resource["extension"]}]
        if _depth(resource) == depth:
            return resource
    raise AssertionError(depth)


def _with_note(patient: str, chars: int) -> dict[str, Any]:
    resource = _observation(patient)
    resource["note"] = [{"text": "x" * chars}]
    return resource


def _extension_values(patient: str, values: int) -> dict[str, Any]:
    """An Observation of exactly ``values`` JSON values, in nested extensions of 100 each."""
    resource = _observation(patient)
    resource["extension"] = []
    total = _values(resource)
    while True:
        if resource["extension"] and len(resource["extension"][-1]["extension"]) < 100:
            if total + 3 > values:  # one more: its object, url and value
                break
            resource["extension"][-1]["extension"].append({"url": EXT, "valueString": "v"})
            total += 3
        else:
            if total + 6 > values:  # an outer extension (object, url, array) with its first
                break
            resource["extension"].append({"url": EXT, "extension": [{"url": EXT, "valueString": "v"}]})
            total += 6
    for extension in [e for outer in resource["extension"] for e in outer["extension"]][: values - total]:
        extension["id"] = "e"  # one value each, for the last few
    assert _values(resource) == values
    return resource


EDGES: dict[str, tuple[Callable[[str, int], dict[str, Any]], int, str]] = {
    "values": (_extension_values, LIMITS["max_json_values"], "JSON values"),
    "array-items": (_with_extensions, LIMITS["max_json_array_items"], "items"),
    "depth": (_nested_extensions, LIMITS["max_json_depth"], "levels"),
    "string-chars": (_with_note, LIMITS["max_json_string_chars"], "characters"),
}


@pytest.mark.parametrize("edge", sorted(EDGES))
def test_a_body_at_the_limit_is_stored_intact_and_one_past_it_refused(
    limited: tuple[Service, dict[str, str], str], edge: str
) -> None:
    service, headers, patient = limited
    build, limit, named = EDGES[edge]
    at_limit = build(patient, limit)
    stored = service.client.post("/fhir/Observation", content=json.dumps(at_limit), headers=headers)
    assert stored.status_code == 201, stored.text[:300]
    read = service.client.get(f"/fhir/Observation/{stored.json()['id']}", headers=headers)
    assert read.status_code == 200
    kept = {k: v for k, v in read.json().items() if k not in ("id", "meta")}
    assert kept == at_limit

    before = _stored(service)
    refused = service.client.post(
        "/fhir/Observation", content=json.dumps(build(patient, limit + 1)), headers=headers
    )
    assert refused.status_code == 413, refused.text[:300]
    issue = refused.json()["issue"][0]
    assert issue["code"] == "too-costly"
    assert f"{limit} {named}" in issue["diagnostics"]
    assert _stored(service) == before


def test_a_bundle_at_the_entry_limit_is_stored_and_one_past_it_refused(
    limited: tuple[Service, dict[str, str], str],
) -> None:
    service, headers, _ = limited
    bundle = load_example(_example("exam-adult-normal"))
    # Resubmitting the example's migrant is matched by ifNoneExist: the same migrant, new exam.
    while len(bundle["entry"]) < LIMITS["max_bundle_entries"]:
        extra = copy.deepcopy(
            next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation")
        )
        extra["fullUrl"] = f"urn:uuid:00000000-0000-4000-8000-{len(bundle['entry']):012d}"
        bundle["entry"].append(extra)
    stored = service.client.post("/fhir", content=json.dumps(bundle), headers=headers)
    assert stored.status_code == 200, stored.text[:300]
    assert len(stored.json()["entry"]) == LIMITS["max_bundle_entries"]

    before = _stored(service)
    extra = copy.deepcopy(bundle["entry"][-1])
    extra["fullUrl"] = "urn:uuid:00000000-0000-4000-8000-999999999999"
    bundle["entry"].append(extra)
    refused = service.client.post("/fhir", content=json.dumps(bundle), headers=headers)
    assert refused.status_code == 413, refused.text[:300]
    assert f"more than {LIMITS['max_bundle_entries']} entries" in refused.json()["issue"][0]["diagnostics"]
    assert _stored(service) == before

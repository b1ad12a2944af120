"""Property-based: resources near the profiles' edges are either stored and read back unchanged,
or refused with an OperationOutcome and nothing stored. Never a 500."""

from __future__ import annotations

import copy
import json
from datetime import UTC
from typing import Any

import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mhr_testkit import EXAMPLES, FHIR_HEADERS, Service, load_example, submit, sync_url

LOINC = "http://loinc.org"
IGRA_ANSWERS = ["LA6576-8", "LA6577-6", "LA11884-6"]
TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=200
)  # RTL, combining marks and control characters included

MUTATIONS = st.one_of(
    st.tuples(
        st.just("drop"),
        st.sampled_from(
            ["status", "code", "subject", "effectiveDateTime", "valueCodeableConcept", "category"]
        ),
    ),
    st.tuples(st.just("answer"), st.one_of(st.sampled_from(IGRA_ANSWERS), TEXT)),
    st.tuples(st.just("status"), st.one_of(st.sampled_from(["final", "amended", "entered-in-error"]), TEXT)),
    st.tuples(
        st.just("effective"),
        st.one_of(st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat()), TEXT),
    ),
    st.tuples(st.just("note"), TEXT),
    st.tuples(st.just("system"), st.one_of(st.just(LOINC), st.just(""), TEXT)),
)


def _igra(bundle: dict[str, Any]) -> dict[str, Any]:
    return next(
        e["resource"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Observation"
        and e["resource"]["code"]["coding"][0]["code"] == "71773-6"
    )


def _mutate(observation: dict[str, Any], kind: str, value: Any) -> None:
    if kind == "drop":
        observation.pop(value, None)
    elif kind == "answer":
        observation["valueCodeableConcept"] = {"coding": [{"system": LOINC, "code": value}]}
    elif kind == "status":
        observation["status"] = value
    elif kind == "effective":
        observation["effectiveDateTime"] = value
    elif kind == "note":
        observation["note"] = [{"text": value}]
    elif kind == "system" and "code" in observation:  # an earlier mutation may have dropped it
        observation["code"]["coding"][0]["system"] = value


def _rows(url: str) -> int:
    engine = sa.create_engine(sync_url(url))
    with engine.connect() as conn:
        count = conn.execute(sa.text("SELECT count(*) FROM resource_versions")).scalar_one()
    engine.dispose()
    return int(count)


def test_observations_near_the_igra_profile_edges(service: Service, database_url: str) -> None:
    clinic = service.register("clinic", "clinic")
    reply = submit(service, clinic, load_example(EXAMPLES[2]))  # the child with a positive IGRA
    assert reply.status_code == 200
    patient = next(
        e["response"]["location"].split("/")[1]
        for e in reply.json()["entry"]
        if e["response"]["location"].startswith("Patient/")
    )
    template = _igra(load_example(EXAMPLES[2]))
    template["subject"] = {"reference": f"Patient/{patient}"}
    template.pop("encounter", None)
    headers = {**FHIR_HEADERS, **service.headers(clinic)}
    outcomes: dict[str, int] = {}

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(MUTATIONS, min_size=1, max_size=3))
    def run(mutations: list[tuple[str, Any]]) -> None:
        observation = copy.deepcopy(template)
        for kind, value in mutations:
            _mutate(observation, kind, value)
        before = _rows(database_url)
        response = service.client.post("/fhir/Observation", content=json.dumps(observation), headers=headers)
        assert response.status_code in (201, 400, 422), response.text
        outcomes[str(response.status_code)] = outcomes.get(str(response.status_code), 0) + 1
        if response.status_code == 201:
            stored = service.client.get(f"/fhir/Observation/{response.json()['id']}", headers=headers).json()
            assert {k: v for k, v in stored.items() if k not in ("id", "meta")} == {
                k: v for k, v in observation.items() if k not in ("id", "meta")
            }
        else:
            body = response.json()
            assert body["resourceType"] == "OperationOutcome" and body["issue"]
            assert _rows(database_url) == before

    run()
    assert outcomes.get("201", 0) > 0 and sum(v for k, v in outcomes.items() if k != "201") > 0, outcomes

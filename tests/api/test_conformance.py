"""What standard FHIR tools see: the CapabilityStatement tells the truth, served resources declare
their profiles and pass an independent validator, and the base specification's rules hold."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
from mhr_testkit import EXAMPLES, FHIR_HEADERS, REPO, Party, Service, load_example, submit

from service.records.intake import CONDITIONAL_CREATE_TYPES
from service.records.search_params import CONTROL_PARAMETERS, SEARCH_PARAMETERS

VALIDATOR = REPO / "tools" / "ig" / "validate.mjs"
TOOLS_INSTALLED = (REPO / "tools" / "ig" / "node_modules" / "@medplum" / "core").is_dir()
needs_validator = pytest.mark.skipif(
    shutil.which("node") is None or not TOOLS_INSTALLED,
    reason="the independent validator is installed by `make ig-tools` (make test and make lint do it)",
)
BASE = "https://mhr.example.org/fhir/StructureDefinition"
PROBE_ID = "0c1f5e1e-0000-4000-8000-000000000000"


@pytest.fixture
def clinic(service: Service) -> Party:
    return service.register("clinic", "clinic")


def _submit_examples(service: Service, clinic: Party) -> dict[str, list[str]]:
    """Every example exam, stored; the ids written, per type."""
    ids: dict[str, list[str]] = {}
    for example in EXAMPLES:
        reply = submit(service, clinic, load_example(example))
        assert reply.status_code == 200, reply.text
        for entry in reply.json()["entry"]:
            rtype, rid = entry["response"]["location"].split("/")[:2]
            ids.setdefault(rtype, []).append(rid)
    return ids


def _run_validator(paths: list[Path]) -> dict[str, list[dict[str, Any]]]:
    done = subprocess.run(
        ["node", str(VALIDATOR), "--json", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.stdout, done.stderr
    results: dict[str, list[dict[str, Any]]] = json.loads(done.stdout)
    return {Path(name).name: found for name, found in results.items()}


# --------------------------------------------------------------------------- meta.profile


def test_served_resources_declare_the_profiles_they_were_validated_against(
    service: Service, clinic: Party
) -> None:
    ids = _submit_examples(service, clinic)
    headers = service.headers(clinic)
    patient = service.client.get(f"/fhir/Patient/{ids['Patient'][0]}", headers=headers).json()
    assert patient["meta"]["profile"] == [f"{BASE}/mhr-patient"]
    encounter = service.client.get(f"/fhir/Encounter/{ids['Encounter'][0]}", headers=headers).json()
    assert encounter["meta"]["profile"] == [f"{BASE}/mhr-exam-encounter"]
    claimed = set()
    for rid in ids["Observation"]:
        observation = service.client.get(f"/fhir/Observation/{rid}", headers=headers).json()
        claimed.update(observation["meta"].get("profile", []))
    assert {f"{BASE}/mhr-igra", f"{BASE}/mhr-classification-observation", f"{BASE}/mhr-chest-xray"} <= claimed
    # A type no profile applies to carries no claim at all.
    consent = service.client.get(f"/fhir/Consent/{ids['Consent'][0]}", headers=headers).json()
    assert "profile" not in consent["meta"]


# --------------------------------------------------------------------------- independent validator


@needs_validator
def test_every_served_resource_validates_in_an_independent_validator(
    service: Service, clinic: Party, tmp_path: Path
) -> None:
    ids = _submit_examples(service, clinic)
    headers = service.headers(clinic)
    served: dict[str, Any] = {"metadata": service.client.get("/fhir/metadata").json()}
    for rtype, found in ids.items():
        for rid in found:
            served[f"{rtype}-{rid}"] = service.client.get(f"/fhir/{rtype}/{rid}", headers=headers).json()
        served[f"search-{rtype}"] = service.client.get(f"/fhir/{rtype}", headers=headers).json()
    patient = ids["Patient"][0]
    served["everything"] = service.client.get(f"/fhir/Patient/{patient}/$everything", headers=headers).json()
    served["disclosures"] = service.client.get(
        f"/fhir/Patient/{patient}/$disclosures", headers=headers
    ).json()
    served["not-found"] = service.client.get(f"/fhir/Patient/{PROBE_ID}", headers=headers).json()
    served["organization"] = service.client.get(f"/fhir/Organization/{clinic.organization_id}").json()
    folder = tmp_path / "served"  # tmp_path also holds the service's keyring
    folder.mkdir()
    for name, resource in served.items():
        assert "resourceType" in resource, name
        (folder / f"{name}.json").write_bytes(orjson.dumps(resource))
    results = _run_validator([folder])
    assert len(results) == len(served)
    assert {name: found for name, found in results.items() if found} == {}


@needs_validator
def test_history_bundles_validate_in_an_independent_validator(
    service: Service, clinic: Party, tmp_path: Path
) -> None:
    ids = _submit_examples(service, clinic)
    history = service.client.get(
        f"/fhir/Patient/{ids['Patient'][0]}/_history", headers=service.headers(clinic)
    )
    (tmp_path / "history.json").write_bytes(history.content)
    results = _run_validator([tmp_path / "history.json"])
    assert list(results.values()) == [[]]


@needs_validator
def test_the_independent_validator_finds_what_mhr_finds(tmp_path: Path) -> None:
    # Guards the guard: a profile violation must be reported, or the test above proves nothing.
    bundle = load_example(EXAMPLES[0])
    patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    patient = {k: v for k, v in patient.items() if k != "identifier"}
    patient["meta"] = {"profile": [f"{BASE}/mhr-patient"]}
    (tmp_path / "patient.json").write_bytes(orjson.dumps(patient))
    (tmp_path / "observation.json").write_bytes(orjson.dumps({"resourceType": "Observation"}))
    results = _run_validator([tmp_path])
    assert [i["expression"] for i in results["patient.json"]] == [["Patient.identifier"]]
    assert {e for i in results["observation.json"] for e in i["expression"]} >= {
        "Observation.status",
        "Observation.code",
    }


# --------------------------------------------------------------------------- base rules


@pytest.mark.parametrize(
    ("resource_type", "mutate", "expression"),
    [
        ("Patient", lambda r: r.update(gender="mail"), "Patient.gender"),
        ("Encounter", lambda r: r.update(status="bogus-status"), "Encounter.status"),
        ("Observation", lambda r: r.update(status="not-a-status"), "Observation.status"),
        ("Patient", lambda r: r["identifier"][0].update(use="primary"), "Patient.identifier[0].use"),
    ],
    ids=["gender", "encounter-status", "observation-status", "identifier-use"],
)
def test_required_bindings_of_the_base_specification_are_enforced(
    service: Service, clinic: Party, resource_type: str, mutate: Any, expression: str
) -> None:
    bundle = load_example(EXAMPLES[0])
    index, entry = next(
        (i, e) for i, e in enumerate(bundle["entry"]) if e["resource"]["resourceType"] == resource_type
    )
    mutate(entry["resource"])
    response = submit(service, clinic, bundle)
    assert response.status_code == 400, response.text
    (issue,) = response.json()["issue"]
    assert issue["code"] == "code-invalid"
    assert issue["expression"] == [f"Bundle.entry[{index}].resource.{expression.split('.', 1)[1]}"]
    # The diagnostics name the rule, never the value sent.
    assert "mail" not in issue["diagnostics"] and "bogus" not in issue["diagnostics"]
    assert "required binding" in issue["diagnostics"]
    alone = service.client.post(
        f"/fhir/{resource_type}",
        content=json.dumps(entry["resource"] if resource_type == "Patient" else {"resourceType": "Patient"}),
        headers={**FHIR_HEADERS, **service.headers(clinic)},
    )
    assert alone.status_code == 400
    assert service.client.get("/fhir/Patient", headers=service.headers(clinic)).json().get("total") == 0


def test_a_missing_element_is_400_when_fhir_requires_it_and_422_when_a_profile_does(
    service: Service, clinic: Party
) -> None:
    bundle = load_example(EXAMPLES[0])
    index, observation = next(
        (i, e["resource"])
        for i, e in enumerate(bundle["entry"])
        if e["resource"]["resourceType"] == "Observation"
    )
    del observation["status"]  # Observation.status is 1..1 in FHIR R4 itself
    response = submit(service, clinic, bundle)
    assert response.status_code == 400, response.text
    (issue,) = response.json()["issue"]
    assert (issue["code"], issue["expression"]) == ("required", [f"Bundle.entry[{index}].resource.status"])

    bundle = load_example(EXAMPLES[0])
    del bundle["entry"][0]["resource"]["birthDate"]  # 0..1 in FHIR, 1..1 in mhr-patient
    response = submit(service, clinic, bundle)
    assert response.status_code == 422, response.text
    (issue,) = response.json()["issue"]
    assert (issue["code"], issue["expression"]) == ("required", ["Bundle.entry[0].resource.birthDate"])


# --------------------------------------------------------------------------- CapabilityStatement


def _outcome_code(response: Any) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("issue", [{}])[0].get("code") if body.get("resourceType") == "OperationOutcome" else None


def _supported(response: Any) -> bool | None:
    """True: the server performs this interaction; False: it refuses it as such; None: not for this role."""
    if response.status_code == 403:
        return None
    if response.status_code == 405:
        return False
    return not (response.status_code == 404 and _outcome_code(response) == "not-supported")


def test_capability_statement_claims_exactly_what_the_router_supports(
    service: Service, clinic: Party
) -> None:
    ids = _submit_examples(service, clinic)
    auditor = service.register("auditor", "auditor")
    authority = service.register("authority", "authority", purposes=("PUBHLTH",))
    parties = [
        service.headers(clinic),
        service.headers(auditor),
        service.headers(authority, purpose_of_use="PUBHLTH"),
    ]
    statement = service.client.get("/fhir/metadata").json()
    rest = statement["rest"][0]
    claimed = {r["type"]: r for r in rest["resource"]}
    body = {**FHIR_HEADERS}

    def probe(method: str, path: str) -> bool:
        for headers in parties:
            answer = _supported(
                service.client.request(method, path, headers={**headers, **body}, content=b"{}")
            )
            if answer is not None:
                return answer
        return False

    for rtype, declared in claimed.items():
        rid = (ids.get(rtype) or [clinic.organization_id if rtype == "Organization" else PROBE_ID])[0]
        actual = {
            "read": probe("GET", f"/fhir/{rtype}/{rid}"),
            "vread": probe("GET", f"/fhir/{rtype}/{rid}/_history/1"),
            "history-instance": probe("GET", f"/fhir/{rtype}/{rid}/_history"),
            "search-type": probe("GET", f"/fhir/{rtype}"),
            "create": probe("POST", f"/fhir/{rtype}"),
            "update": probe("PUT", f"/fhir/{rtype}/{rid}"),
            "delete": probe("DELETE", f"/fhir/{rtype}/{rid}"),
        }
        interactions = {i["code"] for i in declared.get("interaction", [])}
        assert interactions == {name for name, works in actual.items() if works}, rtype
        if "create" in interactions:
            assert declared.get("conditionalCreate", False) == (rtype in CONDITIONAL_CREATE_TYPES), rtype
        else:
            assert not declared.get("conditionalCreate", False), rtype
        if rtype in SEARCH_PARAMETERS:
            assert {p["name"] for p in declared["searchParam"]} == set(SEARCH_PARAMETERS[rtype]), rtype
        for param in declared.get("searchParam", []):
            assert param.get("definition"), (rtype, param["name"])
    assert set(SEARCH_PARAMETERS) <= set(claimed)
    assert {p["name"] for p in rest["searchParam"]} == set(CONTROL_PARAMETERS)

    # Conditional create is claimed where it works: on Patient ...
    headers = {**FHIR_HEADERS, **service.headers(clinic)}
    bundle = load_example(EXAMPLES[0])
    patient = bundle["entry"][0]["resource"]
    match = bundle["entry"][0]["request"]["ifNoneExist"]
    again = service.client.post(
        "/fhir/Patient", content=json.dumps(patient), headers={**headers, "If-None-Exist": match}
    )
    assert again.status_code == 200, again.text
    # ... and on every other type a clinic creates: an Observation matched by its identifier.
    index = next(i for i, e in enumerate(bundle["entry"]) if e["resource"]["resourceType"] == "Observation")
    bundle["entry"][index]["resource"]["identifier"] = [{"system": "urn:probe", "value": "1"}]
    bundle["entry"][index]["request"]["ifNoneExist"] = "identifier=urn:probe|1"
    statuses = []
    for attempt in ("first", "second"):
        bundle["identifier"]["value"] = f"probe-{attempt}"  # two exams, not a resubmission
        reply = submit(service, clinic, bundle)
        assert reply.status_code == 200, reply.text
        statuses.append(reply.json()["entry"][index]["response"])
    assert [s["status"] for s in statuses] == ["201 Created", "200 OK"]
    assert statuses[0]["location"] == statuses[1]["location"]

    # Sort keys the statement documents are accepted; one it used to document is refused.
    sort_doc = next(p["documentation"] for p in rest["searchParam"] if p["name"] == "_sort")
    keys = [k for k in sort_doc.split("`")[1::2]]
    assert keys
    for key in keys:
        assert service.client.get(f"/fhir/Observation?_sort={key}", headers=headers).status_code == 200, key
    assert service.client.get("/fhir/Observation?_sort=date", headers=headers).status_code == 400

    # Operations: exactly the $-routes of the app, each with a resolvable definition.
    paths = service.client.get("/openapi.json").json()["paths"]
    routes = {(path.split("/")[2], path.rsplit("$", 1)[1]) for path in paths if "$" in path}
    # System-level operations (/fhir/$export) are the statement's rest.operation.
    system = {op for rtype, op in routes if rtype.startswith("$")}
    assert system == {op["name"] for op in rest.get("operation", [])}
    routes = {(rtype, op) for rtype, op in routes if not rtype.startswith("$")}
    # A type-level route for every type that can be created (here: validate).
    creatable = {t for t, r in claimed.items() if "create" in {i["code"] for i in r.get("interaction", [])}}
    routes = {(t, op) for rtype, op in routes for t in (creatable if rtype == "{resource_type}" else {rtype})}
    operations = {(t, op["name"]) for t, r in claimed.items() for op in r.get("operation", [])}
    assert operations == routes
    guide = {json.loads(p.read_text())["url"] for p in (REPO / "fhir").glob("OperationDefinition-*.json")}
    published = (
        "http://hl7.org/fhir/OperationDefinition/",
        "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/",
    )
    for op in [op for r in claimed.values() for op in r.get("operation", [])] + rest.get("operation", []):
        assert op["definition"] in guide or op["definition"].startswith(published), op

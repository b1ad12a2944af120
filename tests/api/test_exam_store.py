"""The encrypted exam store, as a clinic uses it: submit, read back, search, correct."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from mhr_testkit import EXAMPLES, FHIR_HEADERS, Party, Service, load_example, submit, sync_url

CLINICAL_TABLES = ("resource_versions", "resources", "search_tokens", "subjects", "match_keys")


@pytest.fixture
def clinic(service: Service) -> Party:
    return service.register("clinic", "clinic")


def _strip(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k not in ("id", "meta")}


def _resolve(node: Any, aliases: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {
            k: (aliases.get(v, v) if k == "reference" and isinstance(v, str) else _resolve(v, aliases))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_resolve(v, aliases) for v in node]
    return node


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_round_trips_unchanged(service: Service, clinic: Party, example: Path) -> None:
    bundle = load_example(example)
    response = submit(service, clinic, bundle)
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["type"] == "transaction-response"
    assert len(reply["entry"]) == len(bundle["entry"])
    aliases = {}
    for entry, answer in zip(bundle["entry"], reply["entry"], strict=True):
        assert answer["response"]["status"] == "201 Created"
        assert answer["response"]["etag"] == 'W/"1"'
        type_id = "/".join(answer["response"]["location"].split("/")[:2])
        aliases[entry["fullUrl"]] = type_id
    headers = service.headers(clinic)
    for entry, answer in zip(bundle["entry"], reply["entry"], strict=True):
        stored = service.client.get(
            f"/fhir/{answer['response']['location'].rsplit('/_history', 1)[0]}", headers=headers
        )
        assert stored.status_code == 200, (answer, stored.text)
        assert stored.headers["etag"] == 'W/"1"'
        body = stored.json()
        assert body["meta"]["versionId"] == "1"
        assert _strip(body) == _strip(_resolve(entry["resource"], aliases))


def _clear_text_canaries(bundle: dict[str, Any]) -> set[str]:
    """Names, identifiers and coded results of an example: none may be stored in clear."""
    canaries: set[str] = set()
    for entry in bundle["entry"]:
        resource = entry["resource"]
        for name in resource.get("name", []) if resource["resourceType"] == "Patient" else []:
            canaries.update(p for p in [name.get("family"), *name.get("given", [])] if p and len(p) > 3)
        for identifier in resource.get("identifier", []):
            if len(identifier.get("value", "")) > 4:
                canaries.add(identifier["value"])
        value = resource.get("valueCodeableConcept", {})
        for coding in value.get("coding", []):
            canaries.add(coding["code"])
        for coding in resource.get("code", {}).get("coding", []):
            canaries.add(coding["code"])
    return canaries


def _all_stored_bytes(database_url: str, tmp_path: Path) -> bytes:
    if database_url.startswith("sqlite"):
        db_file = Path(database_url.split("///", 1)[1])
        return b"".join(p.read_bytes() for p in db_file.parent.glob(db_file.name + "*"))
    engine = sa.create_engine(sync_url(database_url))
    chunks = []
    with engine.connect() as conn:
        for table in CLINICAL_TABLES:
            for row in conn.execute(sa.text(f"SELECT * FROM {table}")):
                for value in row:
                    chunks.append(
                        bytes(value) if isinstance(value, bytes | memoryview) else str(value).encode()
                    )
    engine.dispose()
    return b"\n".join(chunks)


def test_nothing_clinical_is_stored_in_clear(
    service: Service, clinic: Party, database_url: str, tmp_path: Path
) -> None:
    canaries: set[str] = set()
    for example in EXAMPLES:
        bundle = load_example(example)
        assert submit(service, clinic, bundle).status_code == 200
        canaries |= _clear_text_canaries(bundle)
    assert len(canaries) > 20
    stored = _all_stored_bytes(database_url, tmp_path)
    assert len(stored) > 10_000
    found = sorted(c for c in canaries if c.encode() in stored)
    assert found == []


def _first(reply: Any, resource_type: str) -> str:
    for entry in reply.json()["entry"]:
        location = entry["response"]["location"]
        if location.startswith(resource_type + "/"):
            return location.split("/")[1]
    raise AssertionError(resource_type)


def _tamper(database_url: str, statement: str, **params: Any) -> None:
    engine = sa.create_engine(sync_url(database_url))
    with engine.begin() as conn:
        conn.execute(sa.text(statement), params)
    engine.dispose()


def test_flipped_ciphertext_byte_is_an_integrity_error(
    service: Service, clinic: Party, database_url: str
) -> None:
    reply = submit(service, clinic, load_example(EXAMPLES[0]))
    observation = _first(reply, "Observation")
    engine = sa.create_engine(sync_url(database_url))
    with engine.begin() as conn:
        blob = bytes(
            conn.execute(
                sa.text("SELECT ciphertext FROM resource_versions WHERE id = :id"), {"id": observation}
            ).scalar_one()
        )
        flipped = blob[:40] + bytes([blob[40] ^ 0x01]) + blob[41:]
        conn.execute(
            sa.text("UPDATE resource_versions SET ciphertext = :c WHERE id = :id"),
            {"c": flipped, "id": observation},
        )
    engine.dispose()
    response = service.client.get(f"/fhir/Observation/{observation}", headers=service.headers(clinic))
    assert response.status_code == 500
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "integrity" in outcome["issue"][0]["diagnostics"]


def test_ciphertext_copied_to_another_row_fails(service: Service, clinic: Party, database_url: str) -> None:
    reply = submit(service, clinic, load_example(EXAMPLES[0]))
    ids = [
        e["response"]["location"].split("/")[1]
        for e in reply.json()["entry"]
        if e["response"]["location"].startswith("Observation/")
    ]
    source, target = ids[0], ids[1]
    engine = sa.create_engine(sync_url(database_url))
    with engine.begin() as conn:
        blob = conn.execute(
            sa.text("SELECT ciphertext FROM resource_versions WHERE id = :id"), {"id": source}
        ).scalar_one()
        conn.execute(
            sa.text("UPDATE resource_versions SET ciphertext = :c WHERE id = :id"), {"c": blob, "id": target}
        )
    engine.dispose()
    headers = service.headers(clinic)
    assert service.client.get(f"/fhir/Observation/{source}", headers=headers).status_code == 200
    response = service.client.get(f"/fhir/Observation/{target}", headers=headers)
    assert response.status_code == 500
    assert "integrity" in response.json()["issue"][0]["diagnostics"]


def test_another_clinics_records_are_absent(service: Service, clinic: Party) -> None:
    other = service.register("other clinic", "clinic")
    reply = submit(service, clinic, load_example(EXAMPLES[0]))
    patient = _first(reply, "Patient")
    headers = service.headers(other)
    foreign = service.client.get(f"/fhir/Patient/{patient}", headers=headers)
    missing = service.client.get("/fhir/Patient/00000000-0000-4000-8000-000000000000", headers=headers)
    assert foreign.status_code == missing.status_code == 404
    assert foreign.json() == missing.json()
    for path in (f"/fhir/Patient/{patient}/_history", f"/fhir/Patient/{patient}/_history/1"):
        assert service.client.get(path, headers=headers).status_code == 404
    found = service.client.get(f"/fhir/Observation?patient={patient}", headers=headers).json()
    assert found["total"] == 0 and "entry" not in found  # FHIR JSON has no empty arrays


def test_resubmitted_migrant_is_not_duplicated(service: Service, clinic: Party) -> None:
    bundle = load_example(EXAMPLES[0])
    first = submit(service, clinic, bundle)
    # A second exam of the same migrant (its own exam, so without the first one's identifier).
    del bundle["identifier"]
    second = submit(service, clinic, bundle)
    assert second.status_code == 200
    assert _first(first, "Patient") == _first(second, "Patient")
    assert second.json()["entry"][0]["response"]["status"] == "200 OK"
    patient_entry = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    passport = patient_entry["resource"]["identifier"][0]
    found = service.client.post(
        "/fhir/Patient/_search",
        data={"identifier": f"{passport['system']}|{passport['value']}"},
        headers=service.headers(clinic),
    ).json()
    assert found["total"] == 1
    # The passport number is not echoed into the links the server writes.
    assert all(passport["value"] not in link["url"] for link in found["link"])


def test_search_by_passport_code_date_and_paging(service: Service, clinic: Party) -> None:
    for example in EXAMPLES:
        assert submit(service, clinic, load_example(example)).status_code == 200
    headers = service.headers(clinic)
    bundle = load_example(EXAMPLES[2])
    patient_resource = next(
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"
    )
    passport = patient_resource["identifier"][0]
    # The passport number differently spelt still matches (normalised blind index).
    spaced = passport["value"][:2] + " " + passport["value"][2:].lower()
    found = service.client.get(
        "/fhir/Patient", params={"identifier": f"{passport['system']}|{spaced}"}, headers=headers
    ).json()
    assert found["total"] == 1
    patient_id = found["entry"][0]["resource"]["id"]
    observations = service.client.get(
        "/fhir/Observation", params={"patient": patient_id, "_count": "3"}, headers=headers
    ).json()
    assert observations["total"] == sum(
        1 for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"
    )
    assert len(observations["entry"]) == 3
    next_link = next(link["url"] for link in observations["link"] if link["relation"] == "next")
    assert next_link.startswith("http://testserver/fhir/Observation?")
    second = service.client.get(next_link, headers=headers).json()
    seen = {e["resource"]["id"] for e in observations["entry"]} | {
        e["resource"]["id"] for e in second["entry"]
    }
    assert len(seen) == min(6, observations["total"]) > 3
    igra = service.client.get(
        "/fhir/Observation", params={"code": "http://loinc.org|71773-6"}, headers=headers
    ).json()
    igra_expected = sum(
        1
        for p in EXAMPLES
        for e in load_example(p)["entry"]
        if any(c.get("code") == "71773-6" for c in e["resource"].get("code", {}).get("coding", []))
    )
    assert igra_expected >= 2
    assert igra["total"] == igra_expected
    assert all(e["resource"]["code"]["coding"][0]["code"] == "71773-6" for e in igra["entry"])
    none = service.client.get("/fhir/Encounter", params={"date": "lt1990-01-01"}, headers=headers).json()
    assert none["total"] == 0
    recent = service.client.get("/fhir/Encounter", params={"date": "ge2000-01-01"}, headers=headers).json()
    assert recent["total"] == len(EXAMPLES)


def test_unknown_search_parameter(service: Service, clinic: Party) -> None:
    headers = service.headers(clinic)
    strict = service.client.get("/fhir/Observation", params={"colour": "blue"}, headers=headers)
    assert strict.status_code == 400
    assert strict.json()["issue"][0]["expression"] == ["colour"]
    lenient = service.client.get(
        "/fhir/Observation", params={"colour": "blue"}, headers={**headers, "Prefer": "handling=lenient"}
    )
    assert lenient.status_code == 200


def test_update_makes_a_new_version_with_provenance(service: Service, clinic: Party) -> None:
    reply = submit(service, clinic, load_example(EXAMPLES[0]))
    observation_id = _first(reply, "Observation")
    headers = service.headers(clinic)
    current = service.client.get(f"/fhir/Observation/{observation_id}", headers=headers).json()
    corrected = copy.deepcopy(current)
    corrected["status"] = "entered-in-error"
    response = service.client.put(
        f"/fhir/Observation/{observation_id}",
        content=json.dumps(corrected),
        headers={**headers, **FHIR_HEADERS, "If-Match": 'W/"1"'},
    )
    assert response.status_code == 200, response.text
    assert response.headers["etag"] == 'W/"2"'
    stale = service.client.put(
        f"/fhir/Observation/{observation_id}",
        content=json.dumps(corrected),
        headers={**headers, **FHIR_HEADERS, "If-Match": 'W/"1"'},
    )
    assert stale.status_code == 412
    history = service.client.get(f"/fhir/Observation/{observation_id}/_history", headers=headers).json()
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2", "1"]
    first = service.client.get(f"/fhir/Observation/{observation_id}/_history/1", headers=headers).json()
    assert first["status"] == current["status"]
    provenance = service.client.get(
        "/fhir/Provenance", params={"patient": _first(reply, "Patient")}, headers=headers
    ).json()
    targets = [t["reference"] for e in provenance["entry"] for t in e["resource"]["target"]]
    assert f"Observation/{observation_id}/_history/2" in targets
    agents = [a["who"] for e in provenance["entry"] for a in e["resource"]["agent"]]
    assert {
        "identifier": {"system": "https://mhr.example.org/fhir/sid/client", "value": clinic.client_id}
    } in agents
    deleted = service.client.delete(f"/fhir/Observation/{observation_id}", headers=headers)
    assert deleted.status_code == 405
    assert deleted.json()["resourceType"] == "OperationOutcome"


def _row_count(database_url: str) -> int:
    engine = sa.create_engine(sync_url(database_url))
    with engine.connect() as conn:
        total = sum(conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one() for t in CLINICAL_TABLES)
    engine.dispose()
    return int(total)


@pytest.mark.parametrize(
    ("mutate", "status", "code"),
    [
        (lambda b: b["entry"][3]["resource"].update(status=42), 400, "structure"),
        (lambda b: b["entry"][3]["resource"]["subject"].update(reference="urn:uuid:0000"), 400, "invalid"),
        (
            lambda b: b["entry"][3]["resource"]["subject"].update(reference="Patient/does-not-exist"),
            400,
            "not-found",
        ),
        (lambda b: b["entry"][0]["resource"].pop("identifier"), 422, "required"),
        (lambda b: b.update(type="batch"), 400, "not-supported"),
        (lambda b: b["entry"][3]["request"].update(method="DELETE"), 400, "not-supported"),
    ],
    ids=["bad-code", "dangling-urn", "unknown-patient", "profile-violation", "batch", "delete-entry"],
)
def test_bundle_with_one_bad_entry_stores_nothing(
    service: Service, clinic: Party, database_url: str, mutate: Any, status: int, code: str
) -> None:
    bundle = load_example(EXAMPLES[0])
    assert bundle["entry"][0]["resource"]["resourceType"] == "Patient"
    mutate(bundle)
    before = _row_count(database_url)
    response = submit(service, clinic, bundle)
    assert response.status_code == status, response.text
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == code
    assert _row_count(database_url) == before


def test_malformed_wrong_type_and_oversize_bodies(service: Service, clinic: Party, database_url: str) -> None:
    headers = service.headers(clinic)
    before = _row_count(database_url)
    malformed = service.client.post(
        "/fhir", content=b'{"resourceType": "Bundle",', headers={**headers, **FHIR_HEADERS}
    )
    assert malformed.status_code == 400 and malformed.json()["issue"][0]["code"] == "structure"
    wrong_type = service.client.post(
        "/fhir", content=b"<Bundle/>", headers={**headers, "Content-Type": "application/xml"}
    )
    assert wrong_type.status_code == 415
    unknown = service.client.post("/fhir/Spaceship", content=b"{}", headers={**headers, **FHIR_HEADERS})
    assert unknown.status_code == 404 and unknown.json()["resourceType"] == "OperationOutcome"
    huge = (
        b'{"resourceType":"Bundle","type":"transaction","entry":['
        + b" " * (service.settings.max_request_bytes + 1)
        + b"]}"
    )
    too_big = service.client.post("/fhir", content=huge, headers={**headers, **FHIR_HEADERS})
    assert too_big.status_code == 413 and too_big.json()["resourceType"] == "OperationOutcome"
    assert _row_count(database_url) == before


def test_authorities_and_auditors_cannot_use_the_clinic_api(
    service: Service, clinic: Party, database_url: str
) -> None:
    reply = submit(service, clinic, load_example(EXAMPLES[0]))
    patient = _first(reply, "Patient")
    auditor = service.register("auditor", "auditor")
    assert service.client.get(f"/fhir/Patient/{patient}", headers=service.headers(auditor)).status_code == 403
    posted = service.client.post(
        "/fhir",
        content=json.dumps(load_example(EXAMPLES[0])),
        headers={**FHIR_HEADERS, **service.headers(auditor)},
    )
    assert posted.status_code == 403
    # Every refusal is on the audit record.
    engine = sa.create_engine(sync_url(database_url))
    with engine.connect() as conn:
        contents = [
            json.loads(bytes(c)) for c in conn.execute(sa.text("SELECT content FROM audit_entries")).scalars()
        ]
    engine.dispose()
    refusals = [c for c in contents if c["agent"]["client"] == auditor.client_id and c["outcome"] == "4"]
    assert sorted((c["subtype"], c["detail"]) for c in refusals) == [
        ("Bundle.transaction", "403: this client's role may not use this interaction"),
        ("Patient.read", "403: this client's role may not use this interaction"),
    ]


def test_family_members_sharing_a_case_number_are_two_migrants(service: Service, clinic: Party) -> None:
    first = load_example(EXAMPLES[0])
    sibling = load_example(EXAMPLES[0])
    patient = sibling["entry"][0]["resource"]
    passport = patient["identifier"][0]
    assert passport["type"]["coding"][0]["code"] == "PPN" and len(patient["identifier"]) > 1
    passport["value"] = "ZX0000001"  # another passport; the case number stays the same
    sibling["entry"][0]["request"]["ifNoneExist"] = f"identifier={passport['system']}|ZX0000001"
    sibling["identifier"]["value"] += "-sibling"  # the sibling's exam is another exam
    one, two = submit(service, clinic, first), submit(service, clinic, sibling)
    assert one.status_code == two.status_code == 200, two.text
    assert _first(one, "Patient") != _first(two, "Patient")
    case = patient["identifier"][1]
    shared = service.client.post(
        "/fhir/Patient/_search",
        data={"identifier": f"{case['system']}|{case['value']}"},
        headers=service.headers(clinic),
    ).json()
    assert shared["total"] == 2
    # Matching on the shared case number is now ambiguous: 412, nothing stored.
    ambiguous = load_example(EXAMPLES[0])
    ambiguous["entry"][0]["request"]["ifNoneExist"] = f"identifier={case['system']}|{case['value']}"
    ambiguous["identifier"]["value"] += "-ambiguous"
    refused = submit(service, clinic, ambiguous)
    assert refused.status_code == 412
    assert refused.json()["issue"][0]["code"] == "multiple-matches"

"""Small defects a tester found on the way, each with what must hold instead (SQLite and PostgreSQL):
out-of-range dates, caching of clinical data, identifiers in next links, a transaction entry's
ifMatch, and Provenance written by clients."""

from __future__ import annotations

import copy
import json
from typing import Any
from urllib.parse import quote, unquote

import pytest
import sqlalchemy as sa
from mhr_testkit import BASE_URL, EXAMPLES, FHIR_HEADERS, Party, Service, load_example, submit, sync_url

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
def clinic(service: Service) -> Party:
    return service.register("clinic", "clinic")


def _outcome(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/fhir+json")
    body: dict[str, Any] = response.json()
    assert body["resourceType"] == "OperationOutcome"
    return body


def _located(reply: Any, resource_type: str) -> str:
    return next(
        e["response"]["location"].split("/")[1]
        for e in reply.json()["entry"]
        if e["response"]["location"].startswith(f"{resource_type}/")
    )


def _versions(service: Service) -> int:
    engine = sa.create_engine(sync_url(service.settings.database_url))
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM resource_versions")).scalar_one())
    finally:
        engine.dispose()


# --- dates outside years 1 to 9999 ------------------------------------------------------------
OUT_OF_RANGE = [
    ("Observation", "date", "9999-12-31"),
    ("Observation", "date", "ge9999-12-31"),
    ("Observation", "date", "0001-01-01T00:00:00+14:00"),
    ("Observation", "date", "lt9999-12-31T23:59:59-14:00"),
    ("Patient", "_lastUpdated", "ge9999-12-31"),
    ("Encounter", "_lastUpdated", "9999-12-31T23:59:59.5Z"),
]


@pytest.mark.parametrize(("rtype", "param", "value"), OUT_OF_RANGE)
def test_out_of_range_search_dates_are_a_400(
    service: Service, clinic: Party, rtype: str, param: str, value: str
) -> None:
    headers = service.headers(clinic)
    outcome = _outcome(service.client.get(f"/fhir/{rtype}", params={param: value}, headers=headers), 400)
    assert outcome["issue"][0]["expression"] == [param]
    assert "9999" in outcome["issue"][0]["diagnostics"]  # says which years it takes
    posted = service.client.post(
        f"/fhir/{rtype}/_search", content=f"{param}={quote(value)}", headers={**headers, **FORM}
    )
    _outcome(posted, 400)


@pytest.mark.parametrize("value", ["9999-12-31", "ge9999-12-31", "0001-01-01T00:00:00+14:00"])
def test_out_of_range_audit_dates_are_a_400(service: Service, value: str) -> None:
    auditor = service.register("auditor", "auditor")
    response = service.client.get(
        "/fhir/AuditEvent", params={"date": value}, headers=service.headers(auditor)
    )
    _outcome(response, 400)


def test_a_resource_dated_at_the_end_of_time_is_stored(service: Service, clinic: Party) -> None:
    reply = submit(service, clinic, load_example(EXAMPLES[0]))
    headers = {**FHIR_HEADERS, **service.headers(clinic)}
    for when in ("9999-12-31", "9999-12-31T23:59:59-14:00"):
        observation = {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "note"},
            "subject": {"reference": f"Patient/{_located(reply, 'Patient')}"},
            "effectiveDateTime": when,
        }
        stored = service.client.post("/fhir/Observation", content=json.dumps(observation), headers=headers)
        assert stored.status_code == 201, stored.text[:300]
        assert stored.json()["effectiveDateTime"] == when


# --- Cache-Control -----------------------------------------------------------------------------
def test_clinical_and_audit_responses_are_not_stored_by_caches(service: Service, clinic: Party) -> None:
    reply = submit(service, clinic, load_example(EXAMPLES[0]))
    assert reply.headers["cache-control"] == "no-store"
    headers = service.headers(clinic)
    patient = _located(reply, "Patient")
    auditor = service.register("auditor", "auditor")
    responses = {
        "read": service.client.get(f"/fhir/Patient/{patient}", headers=headers),
        "vread": service.client.get(f"/fhir/Patient/{patient}/_history/1", headers=headers),
        "history": service.client.get(f"/fhir/Patient/{patient}/_history", headers=headers),
        "search": service.client.get("/fhir/Observation", headers=headers),
        "search-post": service.client.post(
            "/fhir/Patient/_search", content="_id=x", headers={**headers, **FORM}
        ),
        "everything": service.client.get(f"/fhir/Patient/{patient}/$everything", headers=headers),
        "disclosures": service.client.get(f"/fhir/Patient/{patient}/$disclosures", headers=headers),
        "not-found": service.client.get("/fhir/Patient/nobody", headers=headers),
        "refused": service.client.post("/fhir", content=b"{", headers={**headers, **FHIR_HEADERS}),
        "audit-search": service.client.get("/fhir/AuditEvent", headers=service.headers(auditor)),
        "unauthenticated": service.client.get(f"/fhir/Patient/{patient}"),
    }
    for name, response in responses.items():
        assert response.headers.get("cache-control") == "no-store", (name, response.status_code)
    # What is public and the same for everyone may still be cached where its route says so.
    smart = service.client.get("/fhir/.well-known/smart-configuration")
    assert smart.headers["cache-control"] == "public, max-age=3600"


# --- identifiers stay out of every URL -------------------------------------------------------
def _passport(example: int) -> tuple[str, str]:
    patient = next(
        e for e in load_example(EXAMPLES[example])["entry"] if e["resource"]["resourceType"] == "Patient"
    )
    identifier = patient["resource"]["identifier"][0]
    return identifier["system"], identifier["value"]


def _links(bundle: dict[str, Any]) -> dict[str, str]:
    return {link["relation"]: link["url"] for link in bundle["link"]}


def test_next_links_of_a_search_by_identifier_name_no_identifier(service: Service, clinic: Party) -> None:
    for example in (0, 1):
        assert submit(service, clinic, load_example(EXAMPLES[example])).status_code == 200
    headers = service.headers(clinic)
    passports = [_passport(0), _passport(1)]
    form = {"identifier": ",".join(f"{s}|{v}" for s, v in passports), "_count": "1"}
    first = service.client.post("/fhir/Patient/_search", data=form, headers=headers)
    assert first.status_code == 200, first.text[:300]
    page = first.json()
    assert page["total"] == 2
    seen = [page["entry"][0]["resource"]["id"]]
    cursors = []
    while "next" in _links(page):
        url = _links(page)["next"]
        for _, value in passports:
            assert value not in url and value not in unquote(url) and value.lower() not in url.lower()
        assert "identifier" not in url
        cursors.append(url)
        followed = service.client.get(url, headers=headers)  # a GET, as clients follow next links
        assert followed.status_code == 200, followed.text[:300]
        page = followed.json()
        assert page["total"] == 2
        assert all("identifier" not in link for link in _links(page).values())
        seen.extend(e["resource"]["id"] for e in page["entry"])
    assert len(seen) == 2 == len(set(seen))
    assert {_passport_of(service, headers, pid) for pid in seen} == {v for _, v in passports}
    # The same search again: a cursor that looks unrelated (the two cannot be linked).
    again = service.client.post("/fhir/Patient/_search", data=form, headers=headers).json()
    assert _links(again)["next"] != cursors[0]
    # A cursor carries its identifiers: adding others to it is refused, not silently combined.
    added = quote(f"{passports[0][0]}|{passports[0][1]}", safe="")
    mixed = service.client.get(f"{cursors[0]}&identifier={added}", headers=headers)
    _outcome(mixed, 400)


def _passport_of(service: Service, headers: dict[str, str], patient_id: str) -> str:
    patient = service.client.get(f"/fhir/Patient/{patient_id}", headers=headers).json()
    return str(patient["identifier"][0]["value"])


# --- a transaction entry's ifMatch -------------------------------------------------------------
def test_a_stale_if_match_in_a_transaction_refuses_it_whole(service: Service, clinic: Party) -> None:
    reply = submit(service, clinic, load_example(EXAMPLES[0]))
    headers = service.headers(clinic)
    observation_id = _located(reply, "Observation")
    patient_id = _located(reply, "Patient")
    current = service.client.get(f"/fhir/Observation/{observation_id}", headers=headers).json()
    patient = service.client.get(f"/fhir/Patient/{patient_id}", headers=headers).json()

    def transaction(if_match: str) -> Any:
        corrected = copy.deepcopy(current)
        corrected["status"] = "amended"
        renamed = copy.deepcopy(patient)
        renamed["gender"] = "unknown"
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "fullUrl": f"{BASE_URL}/fhir/Patient/{patient_id}",
                    "resource": renamed,
                    "request": {"method": "PUT", "url": f"Patient/{patient_id}"},
                },
                {
                    "fullUrl": f"{BASE_URL}/fhir/Observation/{observation_id}",
                    "resource": corrected,
                    "request": {"method": "PUT", "url": f"Observation/{observation_id}", "ifMatch": if_match},
                },
            ],
        }
        return submit(service, clinic, bundle)

    before = _versions(service)
    stale = transaction('W/"7"')
    outcome = _outcome(stale, 412)
    assert outcome["issue"][0]["expression"] == ["Bundle.entry[1].request.ifMatch"]
    assert _versions(service) == before  # the Patient entry before it was not written either
    assert (
        service.client.get(f"/fhir/Patient/{patient_id}", headers=headers).json()["meta"]["versionId"] == "1"
    )
    fresh = transaction('W/"1"')
    assert fresh.status_code == 200, fresh.text[:300]
    assert [e["response"]["etag"] for e in fresh.json()["entry"]] == ['W/"2"', 'W/"2"']


# --- Provenance is the service's ----------------------------------------------------------------
def _provenance(target: str) -> dict[str, Any]:
    return {
        "resourceType": "Provenance",
        "target": [{"reference": target}],
        "recorded": "2024-01-01T00:00:00Z",
        "agent": [{"who": {"reference": "Organization/forged"}}],
    }


def test_clients_cannot_write_provenance(service: Service, clinic: Party) -> None:
    reply = submit(service, clinic, load_example(EXAMPLES[0]))
    headers = {**FHIR_HEADERS, **service.headers(clinic)}
    observation = f"Observation/{_located(reply, 'Observation')}"
    written = service.client.get("/fhir/Provenance", headers=headers).json()["entry"][0]["resource"]
    before = _versions(service)

    created = service.client.post(
        "/fhir/Provenance", content=json.dumps(_provenance(observation)), headers=headers
    )
    _outcome(created, 405)
    assert created.headers["allow"] == "GET"
    forged = {**written, "agent": [{"who": {"reference": "Organization/forged"}}]}
    updated = service.client.put(
        f"/fhir/Provenance/{written['id']}", content=json.dumps(forged), headers=headers
    )
    _outcome(updated, 405)
    bundle = load_example(EXAMPLES[1])
    bundle["entry"].append(
        {
            "resource": _provenance(bundle["entry"][0]["fullUrl"]),
            "request": {"method": "POST", "url": "Provenance"},
        }
    )
    in_transaction = service.client.post("/fhir", content=json.dumps(bundle), headers=headers)
    outcome = _outcome(in_transaction, 422)
    assert outcome["issue"][0]["expression"] == [f"Bundle.entry[{len(bundle['entry']) - 1}].resource"]
    assert _versions(service) == before
    assert service.client.get(f"/fhir/Provenance/{written['id']}", headers=headers).json() == written


def test_the_capability_statement_offers_no_provenance_writes(service: Service) -> None:
    statement = service.client.get("/fhir/metadata").json()
    provenance = next(r for r in statement["rest"][0]["resource"] if r["type"] == "Provenance")
    assert {i["code"] for i in provenance["interaction"]} == {
        "read",
        "vread",
        "history-instance",
        "search-type",
    }
    assert not provenance.get("conditionalCreate")

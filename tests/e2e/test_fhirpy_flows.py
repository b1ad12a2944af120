"""The clinic and authority flows through a real FHIR client library (fhirpy) against a running server."""

from __future__ import annotations

from typing import Any

from e2e_helpers import LiveServer
from fhirpy import SyncFHIRClient
from mhr_testkit import EXAMPLES, load_example

# The refugee example's Consent names the organization with identifier "authority-a".
CONSENTED = "exam-refugee-vaccinations"


def _client(server: LiveServer, token: str) -> SyncFHIRClient:
    return SyncFHIRClient(server.fhir_url, authorization=f"Bearer {token}")


def _passport(bundle: dict[str, Any]) -> str:
    patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    passport = next(i for i in patient["identifier"] if i["type"]["coding"][0]["code"] == "PPN")
    return f"{passport['system']}|{passport['value']}"


def test_clinic_submits_searches_and_reads_back(live_server: LiveServer) -> None:
    clinic = live_server.registry.register("clinic", "clinic")
    fhir = _client(live_server, live_server.token(clinic))
    for example in EXAMPLES:
        bundle = load_example(example)
        reply = fhir.execute("", method="post", data=bundle)
        assert reply["type"] == "transaction-response"
        assert all(e["response"]["status"] == "201 Created" for e in reply["entry"])
        patients = fhir.resources("Patient").search(identifier=_passport(bundle)).fetch_all()
        assert len(patients) == 1
        patient = patients[0]
        everything = fhir.execute(f"Patient/{patient.id}/$everything", method="get")
        types = sorted({e["resource"]["resourceType"] for e in everything["entry"]})
        submitted = sorted({e["resource"]["resourceType"] for e in bundle["entry"]} | {"Provenance"})
        assert types == submitted
        observations = fhir.resources("Observation").search(patient=patient.id).limit(2).fetch_all()
        expected = sum(1 for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation")
        assert len(observations) == expected  # fetch_all follows the absolute next links
        first = observations[0]
        again = fhir.reference("Observation", first.id).to_resource()
        assert again["code"] == first["code"]


def test_two_authorities_see_exactly_what_consent_allows(live_server: LiveServer) -> None:
    registry = live_server.registry
    clinic = registry.register("clinic", "clinic")
    authority_a = registry.register("authority A", "authority", purposes=("PUBHLTH",), org_id="authority-a")
    authority_b = registry.register("authority B", "authority", purposes=("PUBHLTH",), org_id="authority-b")
    clinic_fhir = _client(live_server, live_server.token(clinic))
    consented_patient = None
    for example in EXAMPLES:
        reply = clinic_fhir.execute("", method="post", data=load_example(example))
        if example.stem == CONSENTED:
            consented_patient = reply["entry"][0]["response"]["location"].split("/")[1]
    assert consented_patient is not None

    a = _client(live_server, live_server.token(authority_a, "system/*.rs", "PUBHLTH"))
    new_for_a = a.resources("Patient").search(_lastUpdated="gt2000-01-01").fetch_all()
    assert [p.id for p in new_for_a] == [consented_patient]
    everything = a.execute(f"Patient/{consented_patient}/$everything", method="get")
    assert everything["total"] >= 5
    observations = a.resources("Observation").search(patient=consented_patient).limit(1).fetch_all()
    assert observations
    b = _client(live_server, live_server.token(authority_b, "system/*.rs", "PUBHLTH"))
    assert b.resources("Patient").search(_lastUpdated="gt2000-01-01").fetch_all() == []
    assert b.resources("Observation").search(patient=consented_patient).fetch_all() == []

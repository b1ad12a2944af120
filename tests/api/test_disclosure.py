"""Consent-scoped disclosure to receiving authorities: every route against every consent situation."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from mhr_testkit import EXAMPLES, FHIR_HEADERS, Party, Service, load_example, submit, sync_url

SCOPE = {
    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]
}
CATEGORY = [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}]
RECIPIENT = {
    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]
}
HIV_TEST = {"system": "http://loinc.org", "code": "75622-1"}


def _day(offset: int) -> str:
    return (datetime.now(UTC) + timedelta(days=offset)).date().isoformat()


def consent(
    patient_id: str,
    organization_id: str,
    *,
    status: str = "active",
    purpose: str = "PUBHLTH",
    classes: tuple[str, ...] = (),
    labels: tuple[str, ...] = (),
    start: int = -30,
    end: int = 365,
) -> dict[str, Any]:
    provision: dict[str, Any] = {
        "type": "permit",
        "period": {"start": _day(start), "end": _day(end)},
        "actor": [{"role": RECIPIENT, "reference": {"reference": f"Organization/{organization_id}"}}],
        "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": purpose}],
    }
    if classes:
        provision["class"] = [{"system": "http://hl7.org/fhir/resource-types", "code": c} for c in classes]
    if labels:
        provision["securityLabel"] = [
            {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": label} for label in labels
        ]
    return {
        "resourceType": "Consent",
        "status": status,
        "scope": SCOPE,
        "category": CATEGORY,
        "patient": {"reference": f"Patient/{patient_id}"},
        "dateTime": _day(-30),
        "policy": [{"uri": "https://mhr.example.org/fhir/policy/voluntary-consent"}],
        "provision": provision,
    }


@dataclass
class World:
    service: Service
    clinic: Party
    authority: Party
    other: Party
    patient: str
    observation: str
    hiv_observation: str
    encounter: str

    def post_consent(self, body: dict[str, Any]) -> str:
        response = self.service.client.post(
            "/fhir/Consent",
            content=json.dumps(body),
            headers={**FHIR_HEADERS, **self.service.headers(self.clinic)},
        )
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def withdraw(self, consent_id: str) -> None:
        headers = self.service.headers(self.clinic)
        current = self.service.client.get(f"/fhir/Consent/{consent_id}", headers=headers).json()
        current["status"] = "inactive"
        response = self.service.client.put(
            f"/fhir/Consent/{consent_id}", content=json.dumps(current), headers={**FHIR_HEADERS, **headers}
        )
        assert response.status_code == 200, response.text


@pytest.fixture
def world(service: Service) -> World:
    return make_world(service)


def make_world(service: Service) -> World:
    """One migrant's exam with an HIV test among its Observations, one clinic, two authorities."""
    clinic = service.register("clinic", "clinic")
    authority = service.register("authority A", "authority", purposes=("PUBHLTH", "TREAT"))
    other = service.register("authority B", "authority", purposes=("PUBHLTH",))
    bundle = load_example(EXAMPLES[1])  # adult, normal exam, no consent of its own
    assert not any(e["resource"]["resourceType"] == "Consent" for e in bundle["entry"])
    observation_template = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation")
    hiv = copy.deepcopy(observation_template)
    hiv["fullUrl"] = "urn:uuid:6a1b0b8e-0000-4000-8000-00000000c0de"
    hiv["resource"]["code"] = {"coding": [HIV_TEST]}
    hiv["resource"].pop("valueQuantity", None)
    hiv["resource"]["valueCodeableConcept"] = {
        "coding": [{"system": "http://snomed.info/sct", "code": "260385009"}]
    }
    hiv["resource"].pop("meta", None)
    bundle["entry"].append(hiv)
    reply = submit(service, clinic, bundle)
    assert reply.status_code == 200, reply.text
    locations = [e["response"]["location"].split("/")[:2] for e in reply.json()["entry"]]
    patient = next(i for t, i in locations if t == "Patient")
    encounter = next(i for t, i in locations if t == "Encounter")
    observation = next(i for t, i in locations if t == "Observation")
    hiv_observation = locations[-1][1]
    return World(service, clinic, authority, other, patient, observation, hiv_observation, encounter)


def _get(world: World, party: Party, path: str, purpose: str = "PUBHLTH", **params: str) -> Any:
    return world.service.client.get(
        path, params=params, headers=world.service.headers(party, purpose_of_use=purpose)
    )


ROUTES: dict[str, Callable[[World, Party, str], tuple[int, int]]] = {}


def route(name: str) -> Callable[[Callable[[World, Party, str], tuple[int, int]]], Any]:
    def register(fn: Callable[[World, Party, str], tuple[int, int]]) -> Any:
        ROUTES[name] = fn
        return fn

    return register


def _count_or_404(response: Any) -> tuple[int, int]:
    """(status, number of resources disclosed)."""
    if response.status_code != 200:
        return response.status_code, 0
    body = response.json()
    if body["resourceType"] == "Bundle":
        assert body["total"] == len(body.get("entry", []))
        return 200, len(body.get("entry", []))
    return 200, 1


@route("read Patient")
def _read_patient(w: World, p: Party, purpose: str) -> tuple[int, int]:
    return _count_or_404(_get(w, p, f"/fhir/Patient/{w.patient}", purpose))


@route("read Observation")
def _read_obs(w: World, p: Party, purpose: str) -> tuple[int, int]:
    return _count_or_404(_get(w, p, f"/fhir/Observation/{w.observation}", purpose))


@route("vread Observation")
def _vread_obs(w: World, p: Party, purpose: str) -> tuple[int, int]:
    return _count_or_404(_get(w, p, f"/fhir/Observation/{w.observation}/_history/1", purpose))


@route("history Observation")
def _history_obs(w: World, p: Party, purpose: str) -> tuple[int, int]:
    return _count_or_404(_get(w, p, f"/fhir/Observation/{w.observation}/_history", purpose))


@route("search Observation?patient")
def _search_obs(w: World, p: Party, purpose: str) -> tuple[int, int]:
    return _count_or_404(_get(w, p, "/fhir/Observation", purpose, patient=w.patient))


@route("search Patient?_lastUpdated")
def _search_new(w: World, p: Party, purpose: str) -> tuple[int, int]:
    return _count_or_404(_get(w, p, "/fhir/Patient", purpose, _lastUpdated="gt2000-01-01"))


@route("search Encounter?date")
def _search_enc(w: World, p: Party, purpose: str) -> tuple[int, int]:
    return _count_or_404(_get(w, p, "/fhir/Encounter", purpose, date="ge2000-01-01"))


@route("Patient/$everything")
def _everything(w: World, p: Party, purpose: str) -> tuple[int, int]:
    return _count_or_404(_get(w, p, f"/fhir/Patient/{w.patient}/$everything", purpose))


def _unlabelled_observations(w: World) -> int:
    """How many of the migrant's Observations carry no sensitivity label (as the clinic sees them)."""
    found = w.service.client.get(
        "/fhir/Observation",
        params={"patient": w.patient, "_count": "100"},
        headers=w.service.headers(w.clinic),
    ).json()
    act_code = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
    return sum(
        1
        for e in found["entry"]
        if not any(c.get("system") == act_code for c in e["resource"].get("meta", {}).get("security", []))
    )


# situation -> (consent factory or None, purpose asked, expect permitted)
SITUATIONS: dict[str, tuple[Callable[[World], dict[str, Any] | None], str, bool]] = {
    "permitted": (lambda w: consent(w.patient, w.authority.organization_id), "PUBHLTH", True),
    "no consent": (lambda w: None, "PUBHLTH", False),
    "consent for another authority": (
        lambda w: consent(w.patient, w.other.organization_id),
        "PUBHLTH",
        False,
    ),
    "withdrawn": (
        lambda w: consent(w.patient, w.authority.organization_id, status="inactive"),
        "PUBHLTH",
        False,
    ),
    "expired": (
        lambda w: consent(w.patient, w.authority.organization_id, start=-400, end=-1),
        "PUBHLTH",
        False,
    ),
    "not yet started": (
        lambda w: consent(w.patient, w.authority.organization_id, start=5, end=60),
        "PUBHLTH",
        False,
    ),
    "wrong purpose": (lambda w: consent(w.patient, w.authority.organization_id), "TREAT", False),
    "type not in class": (
        lambda w: consent(w.patient, w.authority.organization_id, classes=("Immunization",)),
        "PUBHLTH",
        False,
    ),
}


@pytest.mark.parametrize("situation", list(SITUATIONS))
def test_authority_route_matrix(world: World, situation: str) -> None:
    make, purpose, permitted = SITUATIONS[situation]
    body = make(world)
    if body is not None:
        world.post_consent(body)
    # The HIV test and the syphilis serology (RPR, STD) are labelled and never disclosed here.
    expected_observations = _unlabelled_observations(world)
    assert expected_observations >= 4
    results = {name: fn(world, world.authority, purpose) for name, fn in ROUTES.items()}
    if permitted:
        assert results["read Patient"] == (200, 1)
        assert results["read Observation"] == (200, 1)
        assert results["vread Observation"] == (200, 1)
        assert results["history Observation"] == (200, 1)
        assert results["search Observation?patient"] == (200, expected_observations)
        assert results["search Patient?_lastUpdated"] == (200, 1)
        assert results["search Encounter?date"] == (200, 1)
        status, everything = results["Patient/$everything"]
        assert status == 200 and everything >= expected_observations + 2
    else:
        for name in (
            "read Patient",
            "read Observation",
            "vread Observation",
            "history Observation",
            "Patient/$everything",
        ):
            assert results[name] == (404, 0), name
        for name in ("search Observation?patient", "search Patient?_lastUpdated", "search Encounter?date"):
            assert results[name] == (200, 0), name
    # The other authority never sees anything it has no consent for.
    if situation != "consent for another authority":
        assert _read_patient(world, world.other, "PUBHLTH") == (404, 0)


def test_not_permitted_is_indistinguishable_from_absent(world: World) -> None:
    world.post_consent(consent(world.patient, world.other.organization_id))
    denied = _get(world, world.authority, f"/fhir/Observation/{world.observation}")
    absent = _get(world, world.authority, "/fhir/Observation/00000000-0000-4000-8000-000000000000")
    assert denied.status_code == absent.status_code == 404
    assert denied.json() == absent.json()
    strip = {"x-request-id", "content-length", "date"}
    assert {k: v for k, v in denied.headers.items() if k not in strip} == {
        k: v for k, v in absent.headers.items() if k not in strip
    }


def test_sensitive_label_needs_to_be_named(world: World) -> None:
    world.post_consent(consent(world.patient, world.authority.organization_id))
    hidden = _get(world, world.authority, f"/fhir/Observation/{world.hiv_observation}")
    assert hidden.status_code == 404
    stored = world.service.client.get(
        f"/fhir/Observation/{world.hiv_observation}", headers=world.service.headers(world.clinic)
    ).json()
    assert {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "HIV"} in [
        {k: c[k] for k in ("system", "code")} for c in stored["meta"]["security"]
    ]
    named = world.post_consent(consent(world.patient, world.authority.organization_id, labels=("HIV",)))
    assert named
    shown = _get(world, world.authority, f"/fhir/Observation/{world.hiv_observation}")
    assert shown.status_code == 200
    everything = _get(world, world.authority, "/fhir/Observation", patient=world.patient).json()
    assert world.hiv_observation in {e["resource"]["id"] for e in everything["entry"]}


def test_withdrawal_takes_effect_on_the_next_request(world: World) -> None:
    consent_id = world.post_consent(consent(world.patient, world.authority.organization_id))
    assert _read_patient(world, world.authority, "PUBHLTH") == (200, 1)
    world.withdraw(consent_id)
    assert _read_patient(world, world.authority, "PUBHLTH") == (404, 0)
    assert _search_new(world, world.authority, "PUBHLTH") == (200, 0)


def test_value_concept_search_stays_within_consent(world: World) -> None:
    world.post_consent(consent(world.patient, world.authority.organization_id))
    classification = next(
        e["resource"]
        for e in load_example(EXAMPLES[1])["entry"]
        if e["resource"]["resourceType"] == "Observation"
        and "valueCodeableConcept" in e["resource"]
        and e["resource"]["code"]["coding"][0]["system"] != "http://loinc.org"
    )
    code = classification["code"]["coding"][0]
    value = classification["valueCodeableConcept"]["coding"][0]
    params = {
        "code": f"{code['system']}|{code['code']}",
        "value-concept": f"{value['system']}|{value['code']}",
    }
    mine = _get(world, world.authority, "/fhir/Observation", **params).json()
    assert mine["total"] == 1
    theirs = _get(world, world.other, "/fhir/Observation", **params).json()
    assert theirs["total"] == 0
    wrong = _get(world, world.authority, "/fhir/Observation", **{**params, "value-concept": "x|nope"}).json()
    assert wrong["total"] == 0


def test_disclosures_and_denials_are_audited(world: World, database_url: str) -> None:
    consent_id = world.post_consent(consent(world.patient, world.authority.organization_id))
    assert _read_patient(world, world.authority, "PUBHLTH") == (200, 1)
    assert _read_patient(world, world.other, "PUBHLTH") == (404, 0)
    engine = sa.create_engine(sync_url(database_url))
    with engine.connect() as conn:
        contents = [
            json.loads(bytes(c)) for c in conn.execute(sa.text("SELECT content FROM audit_entries")).scalars()
        ]
    engine.dispose()
    text = json.dumps(contents)
    assert consent_id in text
    disclosures = [
        c for c in contents if c.get("type") == "disclosure" or c.get("event_type") == "disclosure"
    ]
    assert len(disclosures) >= 2, contents[-3:]
    assert "permit.consent" in text and "deny." in text
    # No PHI in the audit trail: the example's names and passport never appear.
    patient = next(
        e["resource"]
        for e in load_example(EXAMPLES[1])["entry"]
        if e["resource"]["resourceType"] == "Patient"
    )
    for name in patient["name"]:
        assert name["family"] not in text
    assert patient["identifier"][0]["value"] not in text


def test_migrant_accounting_of_disclosures(world: World) -> None:
    consent_id = world.post_consent(consent(world.patient, world.authority.organization_id))
    assert _read_patient(world, world.authority, "PUBHLTH") == (200, 1)
    assert _search_obs(world, world.authority, "PUBHLTH")[0] == 200
    assert _read_patient(world, world.other, "PUBHLTH") == (404, 0)  # a refusal is not a disclosure
    report = world.service.client.get(
        f"/fhir/Patient/{world.patient}/$disclosures", headers=world.service.headers(world.clinic)
    )
    assert report.status_code == 200
    disclosures = report.json()["parameter"]
    assert len(disclosures) == 2
    for disclosure in disclosures:
        parts = {p["name"]: p for p in disclosure["part"]}
        assert (
            parts["recipient"]["valueReference"]["reference"]
            == f"Organization/{world.authority.organization_id}"
        )
        assert parts["purpose"]["valueCoding"]["code"] == "PUBHLTH"
        assert parts["consent"]["valueReference"]["reference"] == f"Consent/{consent_id}/_history/1"
    types = {p["valueCode"] for d in disclosures for p in d["part"] if p["name"] == "resourceType"}
    assert types == {"Patient", "Observation"}
    # Only the examining clinic may produce it; for anyone else the migrant does not exist.
    other_clinic = world.service.register("other clinic", "clinic")
    assert (
        world.service.client.get(
            f"/fhir/Patient/{world.patient}/$disclosures", headers=world.service.headers(other_clinic)
        ).status_code
        == 404
    )
    assert (
        world.service.client.get(
            f"/fhir/Patient/{world.patient}/$disclosures",
            headers=world.service.headers(world.authority, purpose_of_use="PUBHLTH"),
        ).status_code
        == 403
    )

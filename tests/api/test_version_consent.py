"""Consent per version, and references to withheld resources, on every read path (SQLite and PostgreSQL).

The world: one migrant whose exam includes an HIV test (labelled HIV at intake), an
authority whose consent names no sensitive label, and the clinic that wrote it all.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import sqlalchemy as sa
from mhr_testkit import FHIR_HEADERS, Service, sync_url
from test_disclosure import World, consent, make_world

HBSAG = {"system": "http://loinc.org", "code": "5196-1"}
ABSENT_ID = "00000000-0000-4000-8000-000000000000"
DATA_ABSENT_REASON = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"


@pytest.fixture
def world(service: Service) -> World:
    return make_world(service)


def _as(world: World, party: Any, path: str, **params: str) -> Any:
    headers = world.service.headers(party, purpose_of_use="PUBHLTH")
    return world.service.client.get(path, params=params, headers=headers)


def _clinic(world: World, path: str, **params: str) -> Any:
    return world.service.client.get(path, params=params, headers=world.service.headers(world.clinic))


def _put(world: World, resource: dict[str, Any]) -> dict[str, Any]:
    path = f"/fhir/{resource['resourceType']}/{resource['id']}"
    response = world.service.client.put(
        path, content=json.dumps(resource), headers={**FHIR_HEADERS, **world.service.headers(world.clinic)}
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


def _post(world: World, resource: dict[str, Any]) -> str:
    response = world.service.client.post(
        f"/fhir/{resource['resourceType']}",
        content=json.dumps(resource),
        headers={**FHIR_HEADERS, **world.service.headers(world.clinic)},
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _recode(world: World, observation_id: str, coding: dict[str, str]) -> dict[str, Any]:
    """The clinic corrects an Observation's code with a PUT (a new version, relabelled)."""
    current = _clinic(world, f"/fhir/Observation/{observation_id}").json()
    current["code"] = {"coding": [coding]}
    current.pop("meta", None)  # labels are the service's to set, from the new code
    return _put(world, current)


def _labels(resource: dict[str, Any]) -> set[str]:
    return {c["code"] for c in resource.get("meta", {}).get("security", [])}


def _entries(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", [])]


def _strip(response: Any) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k not in {"x-request-id", "content-length", "date"}}


def _audit_contents(database_url: str) -> list[dict[str, Any]]:
    engine = sa.create_engine(sync_url(database_url))
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT content FROM audit_entries ORDER BY id")).scalars()
        contents = [json.loads(bytes(c)) for c in rows]
    engine.dispose()
    return contents


# --- 1. older versions are decided on their own labels ---------------------------------------
def test_hiv_version_corrected_away_stays_withheld(world: World) -> None:
    """v1 coded HIV, corrected to a non-sensitive code in v2: the authority sees v2 only."""
    world.post_consent(consent(world.patient, world.authority.organization_id))
    corrected = _recode(world, world.hiv_observation, HBSAG)
    assert corrected["meta"]["versionId"] == "2" and "HIV" not in _labels(corrected)
    base = f"/fhir/Observation/{world.hiv_observation}"

    current = _as(world, world.authority, base)
    assert current.status_code == 200 and current.json()["meta"]["versionId"] == "2"
    assert _as(world, world.authority, f"{base}/_history/2").status_code == 200

    old = _as(world, world.authority, f"{base}/_history/1")
    never = _as(world, world.authority, f"{base}/_history/7")
    assert old.status_code == never.status_code == 404
    assert old.json() == never.json() and _strip(old) == _strip(never)
    assert "75622-1" not in old.text

    history = _as(world, world.authority, f"{base}/_history").json()
    assert [r["meta"]["versionId"] for r in _entries(history)] == ["2"]
    assert history["total"] == 1
    assert "75622-1" not in json.dumps(history)

    # Search and $everything serve the current version: there, v2 is disclosed, v1 never.
    found = _as(world, world.authority, "/fhir/Observation", patient=world.patient, _count="100").json()
    assert world.hiv_observation in {r["id"] for r in _entries(found)}
    everything = _as(world, world.authority, f"/fhir/Patient/{world.patient}/$everything").text
    assert "75622-1" not in everything

    # The clinic that wrote both sees both.
    mine = _clinic(world, f"{base}/_history").json()
    assert [r["meta"]["versionId"] for r in _entries(mine)] == ["2", "1"] and mine["total"] == 2


def test_version_made_sensitive_is_withheld_older_one_is_not(world: World) -> None:
    """v1 non-sensitive, corrected to HIV in v2: read, search and $everything withhold it; the
    non-sensitive v1 is decided on its own labels."""
    world.post_consent(consent(world.patient, world.authority.organization_id))
    _recode(world, world.observation, {"system": "http://loinc.org", "code": "75622-1"})
    base = f"/fhir/Observation/{world.observation}"

    read = _as(world, world.authority, base)
    absent = _as(world, world.authority, f"/fhir/Observation/{ABSENT_ID}")
    assert read.status_code == absent.status_code == 404 and read.json() == absent.json()
    assert _as(world, world.authority, f"{base}/_history/2").status_code == 404
    assert _as(world, world.authority, f"{base}/_history/1").status_code == 200
    history = _as(world, world.authority, f"{base}/_history").json()
    assert [r["meta"]["versionId"] for r in _entries(history)] == ["1"] and history["total"] == 1

    found = _as(world, world.authority, "/fhir/Observation", patient=world.patient, _count="100").json()
    assert world.observation not in {r["id"] for r in _entries(found)}
    assert found["total"] == len(found["entry"])
    by_id = _as(world, world.authority, "/fhir/Observation", _id=world.observation).json()
    assert by_id["total"] == 0 and not by_id.get("entry")
    everything = _as(world, world.authority, f"/fhir/Patient/{world.patient}/$everything").json()
    assert world.observation not in {r["id"] for r in _entries(everything)}


def test_history_paging_counts_only_visible_versions(world: World) -> None:
    world.post_consent(consent(world.patient, world.authority.organization_id))
    for coding in ({"system": "http://loinc.org", "code": "75622-1"}, HBSAG, HBSAG):
        _recode(world, world.observation, coding)  # v2 HIV, v3 and v4 not
    history = _as(world, world.authority, f"/fhir/Observation/{world.observation}/_history").json()
    assert [r["meta"]["versionId"] for r in _entries(history)] == ["4", "3", "1"]
    assert history["total"] == 3
    named = world.post_consent(consent(world.patient, world.authority.organization_id, labels=("HIV",)))
    assert named
    history = _as(world, world.authority, f"/fhir/Observation/{world.observation}/_history").json()
    assert [r["meta"]["versionId"] for r in _entries(history)] == ["4", "3", "2", "1"]
    assert history["total"] == 4


def test_disclosure_audit_names_the_consent_that_admitted_each_version(
    world: World, database_url: str
) -> None:
    plain = world.post_consent(consent(world.patient, world.authority.organization_id))
    labelled = world.post_consent(consent(world.patient, world.authority.organization_id, labels=("HIV",)))
    _recode(world, world.hiv_observation, HBSAG)  # v1 HIV (only `labelled` admits it), v2 not
    history = _as(world, world.authority, f"/fhir/Observation/{world.hiv_observation}/_history").json()
    assert history["total"] == 2
    entries = [
        c
        for c in _audit_contents(database_url)
        if c.get("subtype") == "history-instance" and c.get("type") == "disclosure"
    ]
    decided = {
        (e["id"], e["version"]): c["decision"]
        for c in entries
        for e in c.get("entities", [])
        if e["id"] == world.hiv_observation
    }
    assert decided[(world.hiv_observation, 1)]["consent"] == labelled
    # v2 is admitted by both; the first by consent id decides, as in every statement.
    assert decided[(world.hiv_observation, 2)]["consent"] == min(plain, labelled)
    assert all(d["rule"].startswith("permit.") for d in decided.values())


# --- 4. references to withheld resources ------------------------------------------------------
def _provenances(world: World, party: Any) -> list[dict[str, Any]]:
    path = f"/fhir/Patient/{world.patient}/$everything"
    bundle = (_clinic(world, path) if party is world.clinic else _as(world, party, path)).json()
    return [r for r in _entries(bundle) if r["resourceType"] == "Provenance"]


def test_provenance_never_names_a_withheld_observation(world: World) -> None:
    world.post_consent(consent(world.patient, world.authority.organization_id))
    clinic_view = [r for r in _entries(_clinic(world, "/fhir/Provenance", patient=world.patient).json())]
    if not clinic_view:  # Provenance has no patient element: find it through $everything
        clinic_view = _provenances(world, world.clinic)
    exam_provenance = next(p for p in clinic_view if world.hiv_observation in json.dumps(p))
    targets = {t["reference"] for t in exam_provenance["target"]}
    assert f"Observation/{world.hiv_observation}/_history/1" in targets  # clinics see it as written

    paths = [
        f"/fhir/Provenance/{exam_provenance['id']}",
        f"/fhir/Provenance/{exam_provenance['id']}/_history/1",
        f"/fhir/Provenance/{exam_provenance['id']}/_history",
        f"/fhir/Patient/{world.patient}/$everything",
    ]
    for path in paths:
        response = _as(world, world.authority, path)
        assert response.status_code == 200, path
        assert world.hiv_observation not in response.text, path
        assert f"Observation/{world.observation}" in response.text, path  # the visible ones stay
    searched = _as(world, world.authority, "/fhir/Provenance", _id=exam_provenance["id"])
    assert searched.json()["total"] == 1 and world.hiv_observation not in searched.text
    shown = _as(world, world.authority, paths[0]).json()
    # Dropped, not masked: exactly the targets this authority may read are named (the HIV
    # test and, since syphilis serology is labelled STD, the RPR result are not).
    readable = {
        t
        for t in targets
        if _as(world, world.authority, "/fhir/" + t.split("/_history")[0]).status_code == 200
    }
    assert {t["reference"] for t in shown["target"]} == readable
    assert f"Observation/{world.hiv_observation}/_history/1" not in readable and len(readable) < len(targets)
    assert DATA_ABSENT_REASON not in json.dumps(shown)


def test_version_specific_reference_follows_that_versions_consent(world: World) -> None:
    """The exam's Provenance names the HIV v1; after a correction to v2 (visible) it still may not."""
    world.post_consent(consent(world.patient, world.authority.organization_id))
    _recode(world, world.hiv_observation, HBSAG)
    provenances = _provenances(world, world.authority)
    text = json.dumps(provenances)
    assert f"Observation/{world.hiv_observation}/_history/1" not in text
    assert f"Observation/{world.hiv_observation}/_history/2" in text  # the correction's Provenance


def test_required_reference_is_masked_when_all_are_withheld(world: World) -> None:
    """A correction to HIV gets a Provenance whose only target is withheld: masked, not named."""
    world.post_consent(consent(world.patient, world.authority.organization_id))
    _recode(world, world.observation, {"system": "http://loinc.org", "code": "75622-1"})
    correction = next(
        p
        for p in _provenances(world, world.clinic)
        if f"Observation/{world.observation}/_history/2" in json.dumps(p)
    )
    shown = _as(world, world.authority, f"/fhir/Provenance/{correction['id']}")
    assert shown.status_code == 200
    assert world.observation not in shown.text
    target = shown.json()["target"]
    assert target == [{"extension": [{"url": DATA_ABSENT_REASON, "valueCode": "masked"}]}]


def test_report_results_extensions_and_contained_drop_withheld_references(world: World) -> None:
    world.post_consent(consent(world.patient, world.authority.organization_id))
    hidden = {"reference": f"Observation/{world.hiv_observation}"}
    report = {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "24323-8"}]},
        "subject": {"reference": f"Patient/{world.patient}"},
        "result": [{"reference": f"Observation/{world.observation}"}, {**hidden, "display": "HIV 1+2 Ab"}],
        "extension": [
            {"url": "https://example.org/fhir/StructureDefinition/related", "valueReference": hidden},
            {"url": "https://example.org/fhir/StructureDefinition/note", "valueString": "kept"},
        ],
        "contained": [
            {
                "resourceType": "Observation",
                "id": "inline",
                "status": "final",
                "code": {"text": "summary"},
                "derivedFrom": [hidden],
                "hasMember": [hidden, {"reference": f"Observation/{world.observation}"}],
            }
        ],
    }
    report_id = _post(world, report)
    shown = _as(world, world.authority, f"/fhir/DiagnosticReport/{report_id}")
    assert shown.status_code == 200
    assert world.hiv_observation not in shown.text and "HIV 1+2" not in shown.text
    body = shown.json()
    assert body["result"] == [{"reference": f"Observation/{world.observation}"}]
    assert [e["url"] for e in body["extension"]] == ["https://example.org/fhir/StructureDefinition/note"]
    inline = body["contained"][0]
    assert "derivedFrom" not in inline
    assert inline["hasMember"] == [{"reference": f"Observation/{world.observation}"}]
    searched = _as(world, world.authority, "/fhir/DiagnosticReport", patient=world.patient)
    assert searched.json()["total"] == 1 and world.hiv_observation not in searched.text
    # The clinic sees its submission as written; with HIV named, so does the authority.
    assert world.hiv_observation in _clinic(world, f"/fhir/DiagnosticReport/{report_id}").text
    world.post_consent(consent(world.patient, world.authority.organization_id, labels=("HIV",)))
    assert world.hiv_observation in _as(world, world.authority, f"/fhir/DiagnosticReport/{report_id}").text


def test_encounter_reference_dropped_when_encounters_are_not_consented(world: World) -> None:
    world.post_consent(consent(world.patient, world.authority.organization_id, classes=("Observation",)))
    assert _as(world, world.authority, f"/fhir/Encounter/{world.encounter}").status_code == 404
    shown = _as(world, world.authority, f"/fhir/Observation/{world.observation}")
    assert shown.status_code == 200
    assert "encounter" not in shown.json() and world.encounter not in shown.text
    # The migrant's own Patient reference stays: the disclosure is of their record.
    assert shown.json()["subject"] == {"reference": f"Patient/{world.patient}"}
    assert "encounter" in _clinic(world, f"/fhir/Observation/{world.observation}").json()


@pytest.mark.parametrize("kind", ["read", "vread", "history", "everything"])
def test_withheld_and_absent_refusals_write_the_same_shape(
    world: World, database_url: str, kind: str
) -> None:
    """The 404 for a withheld id and for an unknown one: same answer, one audit entry each, no
    consent decryption to explain it (the entry says which part of the grants failed)."""
    world.post_consent(consent(world.patient, world.other.organization_id))
    paths = {
        "read": "/fhir/Observation/{}",
        "vread": "/fhir/Observation/{}/_history/1",
        "history": "/fhir/Observation/{}/_history",
        "everything": "/fhir/Patient/{}/$everything",
    }
    existing = world.patient if kind == "everything" else world.observation
    before = len(_audit_contents(database_url))
    withheld = _as(world, world.authority, paths[kind].format(existing))
    absent = _as(world, world.authority, paths[kind].format(ABSENT_ID))
    assert withheld.status_code == absent.status_code == 404
    assert withheld.json() == absent.json() and _strip(withheld) == _strip(absent)
    subtype = {"history": "history-instance"}.get(kind, kind)
    entries = [c for c in _audit_contents(database_url)[before:] if c["subtype"] == subtype]
    assert len(entries) == 2
    refused, missed = entries
    assert refused["decision"]["rule"] == "deny.no-grant"
    assert refused["entities"][0]["id"] == existing
    assert missed["entities"][0]["id"].startswith("hmac:") and "decision" not in missed

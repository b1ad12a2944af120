"""Bulk Data export ($export, Bulk Data Access IG 3.0.0), on SQLite and PostgreSQL.

What a receiving authority relies on: a kick-off answers 202 with a status URL; polling says
how far it has got and then hands over a manifest whose files hold exactly what its consents
let it see (no withheld label, no withdrawn consent, no other authority's migrant, a Group's
members only), each resource once; only its own client can poll or download; a cancel or the
expiry removes the files. And what the migrant relies on: one disclosure entry per export.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from bulk_kit import (
    add_migrant,
    authority_headers,
    download,
    everything_exported,
    export_disclosures,
    kick_off,
    permit,
    status_path,
    wait_for_manifest,
)
from mhr_testkit import Service
from test_disclosure import World, make_world

from service.bulk.groups import class_b_group_id
from service.bulk.parameters import EXPORTED_TYPES
from service.bulk.repository import ExportRepository
from service.records.grant_predicate import Audience, GrantFilter
from service.records.repository import RecordRepository, SearchFilter, VersionRow
from service.store.database import Database


def _start(database_url: str, tmp_path: Path, **overrides: object) -> Iterator[Service]:
    values: dict[str, object] = {
        "job_poll_seconds": 0.05,
        "export_dir": tmp_path / "exports",
        "export_subjects_per_step": 2,
    }
    values.update(overrides)
    with Service.start(database_url, tmp_path, **values) as running:
        yield running


@pytest.fixture
def service(database_url: str, tmp_path: Path) -> Iterator[Service]:
    yield from _start(database_url, tmp_path)


@pytest.fixture
def world(service: Service) -> World:
    """Migrant 1 (an HIV test among its Observations) consented to authority A, not B."""
    w = make_world(service)
    permit(w, w.patient, w.authority.organization_id)
    return w


def _export(world: World, party: object = None, path: str = "/fhir/$export", **params: str) -> dict:
    headers = authority_headers(world.service, party or world.authority)  # type: ignore[arg-type]
    location = status_path(kick_off(world.service, headers, path, params))
    return wait_for_manifest(world.service, headers, location)


def test_export_hands_over_what_consent_permits_once_with_one_disclosure_entry(world: World) -> None:
    service = world.service
    headers = authority_headers(service, world.authority)
    kicked = kick_off(service, headers)
    location = status_path(kicked)
    assert kicked.json()["resourceType"] == "OperationOutcome"
    manifest = wait_for_manifest(service, headers, location)
    assert manifest["requiresAccessToken"] is True
    assert manifest["request"] == "http://testserver/fhir/$export"
    assert manifest["transactionTime"].endswith("Z")
    assert manifest["error"] == []
    resources = everything_exported(service, headers, manifest)
    keys = [(r["resourceType"], r["id"]) for r in resources]
    assert len(keys) == len(set(keys))  # each resource once
    assert ("Patient", world.patient) in keys
    assert ("Observation", world.observation) in keys
    # The HIV test's label is not named by the consent: withheld, as from every read.
    assert ("Observation", world.hiv_observation) not in keys
    assert "75622-1" not in str(resources)
    # Nothing in the output names the withheld Observation (references masked as on reads).
    assert world.hiv_observation not in str(resources)
    # What a search by the same authority sees is what the export holds, type by type.
    clinic_visible = service.client.get(
        "/fhir/Observation", params={"patient": world.patient, "_count": "100"}, headers=headers
    ).json()
    exported_observations = {r["id"] for r in resources if r["resourceType"] == "Observation"}
    assert exported_observations == {e["resource"]["id"] for e in clinic_visible["entry"]}
    entries = export_disclosures(service)
    assert [e["patients"] for e in entries] == [[world.patient]]
    assert entries[0]["recipients"] == [world.authority.organization_id]
    assert {(x["type"], x["id"]) for x in entries[0]["entities"]} == set(keys)
    assert entries[0]["decision"]["consent"]


def test_another_authority_and_a_withdrawn_consent_export_nothing(world: World) -> None:
    assert _export(world, world.other)["output"] == []  # authority B: no consent names it
    consent_id = permit(world, world.patient, world.authority.organization_id)
    world.withdraw(consent_id)
    # The first consent still admits A; withdraw that one too (the latest Consent ids first).
    for other in _consents_of(world):
        world.withdraw(other)
    assert _export(world)["output"] == []
    assert export_disclosures(world.service) == []


def _consents_of(world: World) -> list[str]:
    found = world.service.client.get(
        "/fhir/Consent", params={"patient": world.patient}, headers=world.service.headers(world.clinic)
    ).json()
    return [e["resource"]["id"] for e in found.get("entry", []) if e["resource"]["status"] == "active"]


def test_type_since_and_until_filter_the_output(world: World) -> None:
    manifest = _export(world, _type="Patient,Encounter")
    assert sorted(item["type"] for item in manifest["output"]) == ["Encounter", "Patient"]
    assert _export(world, _since="2999-01-01T00:00:00Z")["output"] == []
    assert _export(world, _until="2000-01-01T00:00:00Z")["output"] == []
    first = _export(world)
    later_patient = add_migrant(world.service, world.clinic, 0)
    permit(world, later_patient, world.authority.organization_id)
    since = _export(world, _since=first["transactionTime"])
    exported = everything_exported(world.service, authority_headers(world.service, world.authority), since)
    assert {r["id"] for r in exported if r["resourceType"] == "Patient"} == {later_patient}


def test_group_export_holds_only_the_class_b_members_and_groups_are_per_authority(world: World) -> None:
    service = world.service
    class_b = add_migrant(service, world.clinic, 0)  # Class B
    no_class = add_migrant(service, world.clinic, 1)  # no class
    for patient in (class_b, no_class):
        permit(world, patient, world.authority.organization_id)
    headers = authority_headers(service, world.authority)
    listing = service.client.get("/fhir/Group", headers=headers).json()
    assert listing["total"] == 1
    group = listing["entry"][0]["resource"]
    assert group["id"] == class_b_group_id(world.authority.organization_id)
    assert "member" not in group and group["actual"] is False
    assert service.client.get(f"/fhir/Group/{group['id']}", headers=headers).status_code == 200
    other = authority_headers(service, world.other)
    assert service.client.get(f"/fhir/Group/{group['id']}", headers=other).status_code == 404
    assert kick_off(service, other, f"/fhir/Group/{group['id']}/$export").status_code == 404
    manifest = _export(world, path=f"/fhir/Group/{group['id']}/$export")
    exported = everything_exported(service, headers, manifest)
    assert {r["id"] for r in exported if r["resourceType"] == "Patient"} == {class_b}
    assert {r.get("subject", r.get("patient", {})).get("reference") for r in exported if "subject" in r} == {
        f"Patient/{class_b}"
    }


def test_status_and_files_answer_only_the_client_that_kicked_off(world: World) -> None:
    service = world.service
    headers = authority_headers(service, world.authority)
    location = status_path(kick_off(service, headers))
    manifest = wait_for_manifest(service, headers, location)
    url = manifest["output"][0]["url"].removeprefix("http://testserver")
    other = authority_headers(service, world.other)
    assert service.client.get(location, headers=other).status_code == 404
    assert service.client.delete(location, headers=other).status_code == 404
    assert service.client.get(url, headers=other).status_code == 404
    assert service.client.get(url).status_code == 401
    assert service.client.get(url, headers={"Authorization": "Bearer not-a-token"}).status_code == 401
    assert service.client.get(url, headers=service.headers(world.clinic)).status_code == 403
    assert download(service, headers, url)  # the requester's own token


def test_delete_cancels_and_removes_the_files(world: World, tmp_path: Path) -> None:
    service = world.service
    headers = authority_headers(service, world.authority)
    location = status_path(kick_off(service, headers))
    manifest = wait_for_manifest(service, headers, location)
    export_id = location.rsplit("/", 1)[1]
    assert (tmp_path / "exports" / export_id).is_dir()
    # Stored encrypted: no resource id or FHIR text in clear in any file.
    for sealed in (tmp_path / "exports" / export_id).iterdir():
        assert world.patient.encode() not in sealed.read_bytes()
        assert b"resourceType" not in sealed.read_bytes()
    assert service.client.delete(location, headers=headers).status_code == 202
    assert not (tmp_path / "exports" / export_id).exists()
    assert service.client.get(location, headers=headers).status_code == 404
    url = manifest["output"][0]["url"].removeprefix("http://testserver")
    assert service.client.get(url, headers=headers).status_code == 404
    assert service.client.delete(location, headers=headers).status_code == 404


@pytest.mark.parametrize(
    ("params", "extra", "code"),
    [
        ({}, {"Prefer": ""}, "required"),  # no respond-async
        ({"_outputFormat": "text/csv"}, {}, "not-supported"),
        ({"_type": "Medication"}, {}, "not-supported"),
        ({"_since": "yesterday"}, {}, "invalid"),
        ({"_typeFilter": "Observation?code=1"}, {}, "not-supported"),
        (
            {"_typeFilter": "Observation?code=1"},
            {"Prefer": "respond-async, handling=strict"},
            "not-supported",
        ),
        ({"unknown": "1"}, {}, "not-supported"),
        ({"_since": "2020-01-02T00:00:00Z", "_until": "2020-01-01T00:00:00Z"}, {}, "invalid"),
    ],
)
def test_bad_kick_off_is_a_400_operation_outcome_and_starts_nothing(
    world: World, params: dict[str, str], extra: dict[str, str], code: str
) -> None:
    headers = authority_headers(world.service, world.authority)
    response = kick_off(world.service, headers, params=params, extra=extra)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == code
    assert "Content-Location" not in response.headers


def test_lenient_handling_ignores_unsupported_parameters_and_ndjson_spellings_are_accepted(
    world: World,
) -> None:
    headers = authority_headers(world.service, world.authority)
    lenient = {"Prefer": "respond-async, handling=lenient"}
    assert kick_off(world.service, headers, params={"_typeFilter": "x"}, extra=lenient).status_code == 202
    for spelling in ("application/fhir+ndjson", "application/ndjson", "ndjson"):
        assert kick_off(world.service, headers, params={"_outputFormat": spelling}).status_code == 202


def test_clinics_and_auditors_may_not_export(world: World) -> None:
    service = world.service
    auditor = service.register("auditor", "auditor")
    for party in (world.clinic, auditor):
        response = kick_off(service, service.headers(party))
        assert response.status_code == 403
        assert response.json()["resourceType"] == "OperationOutcome"


def test_expired_exports_are_purged(database_url: str, tmp_path: Path) -> None:
    for running in _start(database_url, tmp_path, export_retention_hours=0.0005):  # ~2 seconds
        w = make_world(running)
        permit(w, w.patient, w.authority.organization_id)
        headers = authority_headers(running, w.authority)
        location = status_path(kick_off(running, headers))
        manifest = wait_for_manifest(running, headers, location)
        export_id = location.rsplit("/", 1)[1]
        url = manifest["output"][0]["url"].removeprefix("http://testserver")
        import time

        deadline = time.monotonic() + 60
        while (tmp_path / "exports" / export_id).exists():
            assert time.monotonic() < deadline, "the purge job did not run"
            time.sleep(0.1)
        assert running.client.get(location, headers=headers).status_code == 404
        assert running.client.get(url, headers=headers).status_code == 404


def test_kick_off_by_post_takes_a_parameters_body(world: World) -> None:
    service = world.service
    headers = authority_headers(service, world.authority)
    body = {"resourceType": "Parameters", "parameter": [{"name": "_type", "valueString": "Patient"}]}
    response = service.client.post(
        "/fhir/$export",
        content=json.dumps(body),
        headers={**headers, "Prefer": "respond-async", "Content-Type": "application/fhir+json"},
    )
    manifest = wait_for_manifest(service, headers, status_path(response))
    assert [item["type"] for item in manifest["output"]] == ["Patient"]
    assert manifest["output"][0]["count"] == 1


def test_a_steps_batch_is_what_a_search_of_its_migrants_shows(world: World) -> None:
    """A step's statement (driven from the migrants) admits exactly the versions, with the same
    permits, that the search statement does for the same migrants: one predicate, two shapes.
    The candidate migrants are those with a grant for this authority, in pseudonym order."""
    service = world.service
    second = add_migrant(service, world.clinic, 2)
    permit(world, second, world.authority.organization_id)
    unconsented = add_migrant(service, world.clinic, 3)
    grant = GrantFilter(world.authority.organization_id, "PUBHLTH", datetime.now(UTC))
    audience = Audience(grant=grant)
    types = list(EXPORTED_TYPES)

    async def both(database: Database) -> tuple[list[str], list[VersionRow], list[VersionRow]]:
        async with database.reading() as session:
            candidates = await ExportRepository(session).next_subjects(grant, types, after=None, limit=10)
            subjects = [world.patient, second, unconsented]
            records = RecordRepository(session)
            batch = await records.current_of_subjects(subjects, types, audience)
            flt = SearchFilter("", resource_types=types, subject_ids=subjects, grant=grant)
            searched = await records.search(flt, newest_first=False, limit=1000)
            return candidates, batch, searched

    candidates, batch, searched = service._run(both)
    assert candidates == sorted([world.patient, second])
    assert sorted({row.subject_id for row in batch}) == sorted([world.patient, second])

    def key(row: VersionRow) -> tuple[object, ...]:
        return (row.resource_type, row.id, row.version_id, row.grant)

    assert sorted(map(key, batch)) == sorted(map(key, searched))
    assert all(row.grant is not None for row in batch)
    assert world.hiv_observation not in {row.id for row in batch}  # its label is not consented to
    assert [(r.subject_id, r.resource_type, r.id) for r in batch] == sorted(
        (r.subject_id, r.resource_type, r.id) for r in batch
    )

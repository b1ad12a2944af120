"""Erasure (GDPR Art. 17) under a two-person rule: what is destroyed, what each caller then sees,
the signed receipt, retention holds, and no 500 anywhere for an erased migrant."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from mhr_testkit import FHIR_HEADERS, Party, Service, sync_url
from test_audit_api import seal
from test_disclosure import World, consent, make_world
from test_key_operations import _open as open_keys

from security.signed_note import NoteVerifier
from service.cli.main import main as cli_main
from service.records.relabel import relabel
from service.store.database import Database

STATUTORY = "https://mhr.example.org/fhir/policy/statutory-public-health"


@pytest.fixture
def world(service: Service) -> World:
    return make_world(service)


@pytest.fixture
def admins(service: Service) -> tuple[Party, Party]:
    return service.register("admin A", "admin"), service.register("admin B", "admin")


def _post(service: Service, party: Party, path: str, body: dict[str, Any] | None = None, **form: str) -> Any:
    if party.role == "authority":
        form.setdefault("purpose_of_use", "PUBHLTH")
    return service.client.post(
        path,
        content=json.dumps(body) if body is not None else None,
        headers={**FHIR_HEADERS, **service.headers(party, **form)},
    )


def _request(w: World, admin: Party, reason: str = "gdpr-art17-1b") -> Any:
    return _post(w.service, admin, "/admin/erasures", {"patient": f"Patient/{w.patient}", "reason": reason})


def _erase(w: World, admins: tuple[Party, Party]) -> dict[str, Any]:
    asked = _request(w, admins[0])
    assert asked.status_code == 201, asked.text
    done = _post(w.service, admins[1], f"/admin/erasures/{asked.json()['id']}/approve")
    assert done.status_code == 200, done.text
    body: dict[str, Any] = done.json()
    return body


def _get(w: World, party: Party, path: str, **params: str) -> Any:
    form = {"purpose_of_use": "PUBHLTH"} if party.role == "authority" else {}
    return w.service.client.get(path, params=params, headers=w.service.headers(party, **form))


def _issue(response: Any) -> str:
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    return str(body["issue"][0]["diagnostics"])


_REMEMBERED = "SELECT count(*) FROM idempotent_requests WHERE CAST(outcome AS TEXT) LIKE '%' || :p || '%'"


def _count(w: World, sql: str) -> int:
    engine = sa.create_engine(sync_url(w.service.settings.database_url))
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(sql), {"p": w.patient}).scalar_one())
    finally:
        engine.dispose()


def test_the_requesting_admin_cannot_approve_their_own_erasure(
    world: World, admins: tuple[Party, Party]
) -> None:
    asked = _request(world, admins[0])
    assert asked.status_code == 201, asked.text
    own = _post(world.service, admins[0], f"/admin/erasures/{asked.json()['id']}/approve")
    assert own.status_code == 403 and "two-person rule" in _issue(own)
    # Nothing was erased: the clinic still reads the record.
    assert _get(world, world.clinic, f"/fhir/Patient/{world.patient}").status_code == 200
    status = world.service.client.get(
        f"/admin/erasures/{asked.json()['id']}", headers=world.service.headers(admins[1])
    )
    assert status.status_code == 200 and status.json()["state"] == "requested"


def test_the_same_person_through_another_admin_client_cannot_approve(
    world: World, admins: tuple[Party, Party]
) -> None:
    service = world.service
    assertion = service.assertion(admins[0], person="ops-anna")
    token_a = service.client.post(
        "/auth/token",
        data={
            "grant_type": "client_credentials",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
            "scope": admins[0].scopes,
        },
    ).json()["access_token"]
    asked = service.client.post(
        "/admin/erasures",
        content=json.dumps({"patient": world.patient, "reason": "gdpr-art17-1b"}),
        headers={**FHIR_HEADERS, "Authorization": f"Bearer {token_a}"},
    )
    assert asked.status_code == 201, asked.text
    assertion_b = service.assertion(admins[1], person="ops-anna")
    token_b = service.client.post(
        "/auth/token",
        data={
            "grant_type": "client_credentials",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion_b,
            "scope": admins[1].scopes,
        },
    ).json()["access_token"]
    same_person = service.client.post(
        f"/admin/erasures/{asked.json()['id']}/approve", headers={"Authorization": f"Bearer {token_b}"}
    )
    assert same_person.status_code == 403 and "two-person rule" in _issue(same_person)


def test_only_admins_request_erasures(world: World) -> None:
    for party in (world.clinic, world.authority):
        refused = _post(
            world.service, party, "/admin/erasures", {"patient": world.patient, "reason": "gdpr-art17-1b"}
        )
        assert refused.status_code == 403 and refused.json()["resourceType"] == "OperationOutcome"


def test_bad_erasure_requests_are_clear_outcomes(world: World, admins: tuple[Party, Party]) -> None:
    bad_reason = _request(world, admins[0], reason="because")
    assert bad_reason.status_code == 400 and "reason must be one of" in _issue(bad_reason)
    unknown = _post(
        world.service, admins[0], "/admin/erasures", {"patient": "nobody", "reason": "gdpr-art17-1b"}
    )
    assert unknown.status_code == 404
    no_patient = _post(world.service, admins[0], "/admin/erasures", {"reason": "gdpr-art17-1b"})
    assert no_patient.status_code == 400
    missing = _post(world.service, admins[1], "/admin/erasures/nope/approve")
    assert missing.status_code == 404


def test_two_admins_erase_and_each_caller_sees_what_it_should(
    world: World, admins: tuple[Party, Party]
) -> None:
    w = world
    w.post_consent(consent(w.patient, w.authority.organization_id))
    assert _get(w, w.authority, f"/fhir/Observation/{w.observation}").status_code == 200
    assert _count(w, "SELECT count(*) FROM disclosure_grants WHERE subject_id = :p") > 0
    assert _count(w, _REMEMBERED) > 0  # the exam's Bundle.identifier, remembered for retries

    done = _erase(w, admins)
    assert done["state"] == "erased" and done["approvedBy"] == admins[1].client_id

    # Destroyed: the key, search tokens, match keys, grants; the ciphertexts are kept, unreadable.
    assert _count(w, "SELECT count(*) FROM subjects WHERE id = :p AND wrapped_key IS NULL") == 1
    assert _count(w, "SELECT count(*) FROM disclosure_grants WHERE subject_id = :p") == 0
    assert _count(w, _REMEMBERED) == 0
    assert (
        _count(
            w,
            "SELECT count(*) FROM match_keys k JOIN resources r"
            " ON r.resource_type = k.resource_type AND r.id = k.resource_id WHERE r.subject_id = :p",
        )
        == 0
    )
    assert (
        _count(
            w,
            "SELECT count(*) FROM search_tokens t JOIN resources r"
            " ON r.resource_type = t.resource_type AND r.id = t.id WHERE r.subject_id = :p",
        )
        == 0
    )
    assert (
        _count(w, "SELECT count(*) FROM resource_versions WHERE subject_id = :p AND labels_token IS NOT NULL")
        == 0
    )
    assert _count(w, "SELECT count(*) FROM resource_versions WHERE subject_id = :p") > 0

    # The submitting clinic is told 410 Gone; the authority and another clinic 404.
    other_clinic = w.service.register("clinic 2", "clinic")
    paths = [
        f"/fhir/Patient/{w.patient}",
        f"/fhir/Observation/{w.observation}",
        f"/fhir/Observation/{w.observation}/_history/1",
        f"/fhir/Observation/{w.observation}/_history",
        f"/fhir/Patient/{w.patient}/$everything",
    ]
    for path in paths:
        gone = _get(w, w.clinic, path)
        assert gone.status_code == 410, (path, gone.text)
        assert gone.json()["issue"][0]["code"] == "deleted"
        for party in (w.authority, other_clinic):
            assert _get(w, party, path).status_code == 404, (path, party.role)

    # Searches skip the erased migrant, for everyone.
    for party in (w.clinic, w.authority):
        for resource_type, params in (
            ("Observation", {"patient": w.patient}),
            ("Patient", {"_lastUpdated": "gt2000-01-01"}),
            ("Encounter", {"date": "ge2000-01-01"}),
            ("Observation", {}),
        ):
            found = _get(w, party, f"/fhir/{resource_type}", **params)
            assert found.status_code == 200, found.text
            assert found.json()["total"] == 0 and "entry" not in found.json()

    # Erasing twice is a clear refusal, not a second effect.
    again = _request(w, admins[0])
    assert again.status_code == 410 and "already erased" in _issue(again)
    twice = _post(w.service, admins[0], f"/admin/erasures/{done['id']}/approve")
    assert twice.status_code == 410


def _routes(w: World) -> list[tuple[str, str, dict[str, Any] | None]]:
    p, o = w.patient, w.observation
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8302-2"}]},
        "subject": {"reference": f"Patient/{p}"},
        "valueQuantity": {"value": 170, "unit": "cm", "system": "http://unitsofmeasure.org", "code": "cm"},
    }
    return [
        ("GET", f"/fhir/Patient/{p}", None),
        ("GET", f"/fhir/Patient/{p}/_history", None),
        ("GET", f"/fhir/Patient/{p}/_history/1", None),
        ("GET", f"/fhir/Patient/{p}/$everything", None),
        ("POST", f"/fhir/Patient/{p}/$everything", None),
        ("GET", f"/fhir/Patient/{p}/$disclosures", None),
        ("GET", f"/fhir/Observation/{o}", None),
        ("GET", f"/fhir/Observation/{o}/_history", None),
        ("GET", f"/fhir/Observation/{o}/_history/1", None),
        ("GET", f"/fhir/Observation?patient={p}", None),
        ("GET", f"/fhir/Observation?subject=Patient/{p}", None),
        ("GET", f"/fhir/Encounter/{w.encounter}", None),
        ("GET", f"/fhir/Patient?_id={p}", None),
        ("PUT", f"/fhir/Observation/{o}", {**observation, "id": o}),
        ("POST", "/fhir/Observation", observation),
        ("POST", "/fhir/Observation/$validate", observation),
        (
            "POST",
            "/fhir",
            {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [{"resource": observation, "request": {"method": "POST", "url": "Observation"}}],
            },
        ),
        ("POST", "/fhir/Consent", consent(p, w.authority.organization_id)),
        ("DELETE", f"/fhir/Patient/{p}", None),
    ]


def test_no_route_answers_500_for_an_erased_migrant(world: World, admins: tuple[Party, Party]) -> None:
    w = world
    _erase(w, admins)
    for party in (w.clinic, w.authority):
        form = {"purpose_of_use": "PUBHLTH"} if party.role == "authority" else {}
        headers = {**FHIR_HEADERS, **w.service.headers(party, **form)}
        for method, path, body in _routes(w):
            response = w.service.client.request(
                method, path, content=json.dumps(body) if body is not None else None, headers=headers
            )
            assert response.status_code < 500, (party.role, method, path, response.text)
            read = method in ("GET", "PUT") and "?" not in path
            write = method == "POST" and path != "/fhir"
            if party.role == "clinic" and (read or write):
                # Its own reads, and writes for the erased migrant: Gone (nothing written).
                assert response.status_code == 410, (method, path, response.status_code)
            assert response.json()["resourceType"] in ("OperationOutcome", "Bundle", "Parameters"), path
            if response.status_code == 200 and response.json()["resourceType"] == "Bundle":
                assert "entry" not in response.json(), (party.role, method, path)  # searches skip them
            elif party.role == "authority":
                assert response.status_code in (400, 403, 404, 405), (method, path, response.status_code)
    # `mhr records relabel` walks every migrant: the erased one is skipped, not a failure.
    counts = _relabel(w.service)
    assert counts.migrants == 0 and counts.resources == 0


def _relabel(service: Service) -> Any:
    runtime = service.fastapi.state.runtime  # type: ignore[attr-defined]

    async def work() -> Any:
        database = Database(service.settings.database_url)
        try:
            return await relabel(database, runtime.records)
        finally:
            await database.dispose()

    return asyncio.run(work())


def test_the_receipt_is_signed_names_what_was_destroyed_and_the_log_still_verifies(
    world: World, admins: tuple[Party, Party], capsys: Any
) -> None:
    w = world
    w.post_consent(consent(w.patient, w.authority.organization_id))
    done = _erase(w, admins)
    auditor = w.service.register("auditor", "auditor")
    vkey = w.service.client.get("/audit/key", headers=w.service.headers(auditor)).text.strip()
    verifier = NoteVerifier.from_vkey(vkey)

    fetched = _get(w, w.clinic, f"/fhir/Patient/{w.patient}/$erasure-receipt")
    assert fetched.status_code == 200, fetched.text
    params = {p["name"]: p["valueString"] for p in fetched.json()["parameter"]}
    assert params["verifierKey"] == vkey and params["receipt"] == done["receipt"]
    text = verifier.verify(params["receipt"])
    lines = text.splitlines()
    assert lines[0] == "mhr erasure receipt v1"
    assert f"subject Patient/{w.patient}" in lines
    assert f"clinic Organization/{w.clinic.organization_id}" in lines
    assert any(
        line.startswith("requested ") and line.endswith(f"client {admins[0].client_id}") for line in lines
    )
    assert any(
        line.startswith("approved ") and line.endswith(f"client {admins[1].client_id}") for line in lines
    )
    assert any(line.startswith("erased 20") for line in lines)
    destroyed = {
        " ".join(line.split()[:2]): int(line.split()[2])
        for line in lines
        if line.startswith(("destroyed", "kept"))
    }
    assert destroyed["destroyed subject-key"] == 1
    assert destroyed["destroyed search-tokens"] > 0
    assert destroyed["destroyed match-keys"] >= 1
    assert destroyed["destroyed remembered-writes"] >= 1
    assert destroyed["destroyed disclosure-grants"] > 0
    assert destroyed["kept-unreadable resource-versions"] > 0
    tampered = params["receipt"].replace("search-tokens", "search-tokenz")
    with pytest.raises(ValueError):
        verifier.verify(tampered)

    # Nobody else gets the receipt (no existence oracle).
    for party in (w.authority, w.service.register("clinic 2", "clinic"), admins[0]):
        assert _get(w, party, f"/fhir/Patient/{w.patient}/$erasure-receipt").status_code in (403, 404)

    # The audit trail keeps its entries, request and approval included, and verifies.
    seal(w.service)
    events = w.service.client.get(
        "/fhir/AuditEvent",
        params={"patient": f"Patient/{w.patient}", "_count": "100"},
        headers=w.service.headers(auditor),
    )
    assert events.status_code == 200, events.text
    subtypes = json.dumps(events.json())
    assert "erasure-request" in subtypes and "erasure-approve" in subtypes
    code = cli_main(["audit", "verify", "--database-url", w.service.settings.database_url, "--vkey", vkey])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("OK:"), out


def test_a_retention_hold_blocks_erasure_naming_its_legal_basis(
    world: World, admins: tuple[Party, Party]
) -> None:
    w = world
    basis = "IfSG section 11 (notifiable disease report retention)"
    held = _post(w.service, admins[0], "/admin/retention-holds", {"patient": w.patient, "legalBasis": basis})
    assert held.status_code == 201, held.text
    blocked = _request(w, admins[1])
    assert blocked.status_code == 409
    assert blocked.json()["issue"][0]["code"] == "business-rule"
    assert f"retention hold {held.json()['id']}" in _issue(blocked) and basis in _issue(blocked)

    released = _post(w.service, admins[1], f"/admin/retention-holds/{held.json()['id']}/release")
    assert released.status_code == 200 and "releasedAt" in released.json()
    _erase(w, admins)
    assert _get(w, w.clinic, f"/fhir/Patient/{w.patient}").status_code == 410


@pytest.mark.parametrize("hold_id", ["564352590914015104", "2147483648", "0", "-1", "abc"])
def test_releasing_a_hold_id_outside_the_key_range_is_a_400(
    service: Service, admins: tuple[Party, Party], hold_id: str
) -> None:
    # Found by schemathesis: an id past the INTEGER key made PostgreSQL's driver fail (a 500).
    answered = _post(service, admins[0], f"/admin/retention-holds/{hold_id}/release")
    assert answered.status_code == 400, answered.text
    assert answered.json()["resourceType"] == "OperationOutcome"


def test_a_statutory_consent_blocks_erasure_at_request_and_at_approval(
    world: World, admins: tuple[Party, Party]
) -> None:
    w = world
    asked = _request(w, admins[0])
    assert asked.status_code == 201
    statutory = consent(w.patient, w.authority.organization_id)
    statutory["policy"] = [{"uri": STATUTORY}]
    consent_id = w.post_consent(statutory)
    blocked = _post(w.service, admins[1], f"/admin/erasures/{asked.json()['id']}/approve")
    assert blocked.status_code == 409, blocked.text
    assert f"Consent/{consent_id}" in _issue(blocked) and "statutory" in _issue(blocked)
    assert _get(w, w.clinic, f"/fhir/Patient/{w.patient}").status_code == 200
    assert _get(w, w.authority, f"/fhir/Observation/{w.observation}").status_code == 200


def test_a_destroyed_subject_key_reads_as_gone_not_as_tampering(world: World) -> None:
    """Regression: a migrant whose key is destroyed (as erasure leaves the row) was a 500
    "integrity" failure on every path. Now: 410 to the submitting clinic, 404 to others."""
    w = world
    engine = sa.create_engine(sync_url(w.service.settings.database_url))
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "UPDATE subjects SET wrapped_key = NULL, erased_at = CURRENT_TIMESTAMP WHERE id = :p"
                ),
                {"p": w.patient},
            )
    finally:
        engine.dispose()
    for path in (
        f"/fhir/Patient/{w.patient}",
        f"/fhir/Observation/{w.observation}",
        f"/fhir/Observation?patient={w.patient}",
    ):
        answer = _get(w, w.clinic, path)
        assert answer.status_code in (200, 410), (path, answer.text)
        if answer.status_code == 200:
            assert "entry" not in answer.json()
    assert _get(w, w.authority, f"/fhir/Patient/{w.patient}").status_code == 404


def test_operators_approve_and_read_status_from_the_shell(
    world: World, admins: tuple[Party, Party], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    w = world
    settings = w.service.settings
    monkeypatch.setenv("MHR_ENV", "test")
    monkeypatch.setenv("MHR_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("MHR_KEYRING_PATH", str(settings.keyring_path))
    monkeypatch.setenv("MHR_PUBLIC_BASE_URL", settings.public_base_url)
    asked = _request(w, admins[0])
    assert asked.status_code == 201
    capsys.readouterr()
    # The shell's operator is another admin than the API client that asked: the approval erases.
    assert cli_main(["erasure", "approve", asked.json()["id"]]) == 0
    approved = json.loads(capsys.readouterr().out)
    assert approved["state"] == "erased"
    assert cli_main(["erasure", "status", asked.json()["id"]]) == 0
    status = json.loads(capsys.readouterr().out)
    auditor = w.service.register("auditor", "auditor")
    vkey = w.service.client.get("/audit/key", headers=w.service.headers(auditor)).text.strip()
    assert "erased " in NoteVerifier.from_vkey(vkey).verify(status["receipt"])
    assert _get(w, w.clinic, f"/fhir/Patient/{w.patient}").status_code == 410
    # Asking again from the shell is a clear refusal, not a traceback.
    assert cli_main(["erasure", "request", "--patient", w.patient, "--reason", "gdpr-art17-1b"]) == 2
    assert "already erased" in capsys.readouterr().err


@pytest.fixture
def any_keys_service(
    database_url: str, tmp_path: Path, key_provider_settings: dict[str, object]
) -> Iterator[Service]:
    """The service under the keyring file and under a PKCS#11 token (SoftHSM2)."""
    keys = open_keys(key_provider_settings, tmp_path)
    with Service.start(database_url, tmp_path, keys=keys, **key_provider_settings) as running:  # type: ignore[arg-type]
        yield running


def test_erasure_and_its_receipt_under_each_key_provider(any_keys_service: Service) -> None:
    """The key is destroyed and the receipt signed by whichever provider holds the keys
    (in a token the log key signs inside it); the clinic's read is then Gone, not 500."""
    service = any_keys_service
    w = make_world(service)
    admins = (service.register("admin A", "admin"), service.register("admin B", "admin"))
    done = _erase(w, admins)
    auditor = service.register("auditor", "auditor")
    vkey = service.client.get("/audit/key", headers=service.headers(auditor)).text.strip()
    assert "destroyed subject-key 1" in NoteVerifier.from_vkey(vkey).verify(done["receipt"]).splitlines()
    assert _get(w, w.clinic, f"/fhir/Observation/{w.observation}").status_code == 410
    assert _get(w, w.authority, f"/fhir/Observation/{w.observation}").status_code == 404

"""The auditor API, audit entries written by requests, and fail-closed auditing."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest
import sqlalchemy as sa
from fhir.resources.R4B.auditevent import AuditEvent
from mhr_testkit import BASE_URL, Service, sync_url

from security import merkle
from security.signed_note import Checkpoint, NoteVerifier
from service.audit import log as audit_log
from service.store.database import Database

AUDIT_SCOPE = "system/AuditEvent.rs"


def seal(service: Service) -> int:
    runtime = service.fastapi.state.runtime  # type: ignore[attr-defined]
    signer = runtime.log_signer

    async def work() -> int:
        database = Database(service.settings.database_url)
        try:
            return await audit_log.seal_all(database, signer, signer.name)
        finally:
            await database.dispose()

    return asyncio.run(work())


def count_entries(url: str) -> int:
    engine = sa.create_engine(sync_url(url))
    with engine.connect() as conn:
        total = int(conn.execute(sa.text("SELECT count(*) FROM audit_entries")).scalar_one())
    engine.dispose()
    return total


def auditor_headers(service: Service) -> dict[str, str]:
    auditor = service.parties.get("auditor") or service.register("auditor", "auditor")
    return service.headers(auditor, AUDIT_SCOPE)


def test_only_auditors_read_the_audit_log(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    authority = service.register("authority", "authority", purposes=("PUBHLTH",))
    for party in (clinic, authority):
        response = service.client.get("/fhir/AuditEvent", headers=service.headers(party))
        assert response.status_code == 403
        assert response.json()["resourceType"] == "OperationOutcome"
        assert service.client.get("/audit/checkpoint", headers=service.headers(party)).status_code == 403
    assert service.client.get("/fhir/AuditEvent").status_code == 401
    headers = auditor_headers(service)
    # The denials are on the record, with who was refused.
    bundle = service.client.get("/fhir/AuditEvent?outcome=4&action=E", headers=headers).json()
    refused = {
        agent["who"]["identifier"]["value"]
        for entry in bundle["entry"]
        for agent in entry["resource"]["agent"]
        if "identifier" in agent["who"]
    }
    assert {clinic.client_id, authority.client_id} <= refused


def test_token_entries_search_paging_and_fhir_shape(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    for _ in range(3):
        service.token(clinic)
    bad = service.request_token(clinic, scope="system/Nonsense")
    assert bad.status_code == 400
    headers = auditor_headers(service)

    page = service.client.get(
        f"/fhir/AuditEvent?agent={clinic.client_id}&type=110114&_count=2", headers=headers
    )
    assert page.status_code == 200, page.text
    bundle = page.json()
    assert len(bundle["entry"]) == 2
    next_url = next(link["url"] for link in bundle["link"] if link["relation"] == "next")
    assert next_url.startswith(f"{BASE_URL}/fhir/AuditEvent?")
    rest = service.client.get(next_url, headers=headers).json()
    # Three tokens and the refused request: its assertion verified, so it names the client.
    assert len(rest["entry"]) == 2 and not any(link["relation"] == "next" for link in rest["link"])
    event = bundle["entry"][0]["resource"]
    AuditEvent.model_validate(event)  # a valid FHIR AuditEvent
    assert event["type"]["code"] == "110114" and event["outcome"] == "0"

    refused = service.client.get("/fhir/AuditEvent?type=login&outcome=4", headers=headers).json()
    [outcome] = [e["resource"]["outcomeDesc"] for e in refused["entry"]]
    assert outcome.startswith("invalid_scope: none of the requested scopes may be granted")
    today = event["recorded"][:10]
    dated = service.client.get(f"/fhir/AuditEvent?date=ge{today}&date=lt2999-01-01", headers=headers)
    assert len(dated.json()["entry"]) >= 4
    assert "entry" not in service.client.get("/fhir/AuditEvent?date=2001", headers=headers).json()
    bad_param = service.client.get("/fhir/AuditEvent?date=yesterday", headers=headers)
    assert bad_param.status_code == 400 and bad_param.json()["resourceType"] == "OperationOutcome"

    one = service.client.get(f"/fhir/AuditEvent/{event['id']}", headers=headers)
    assert one.status_code == 200 and one.json()["id"] == event["id"]
    assert service.client.get("/fhir/AuditEvent/999999", headers=headers).status_code == 404

    export = service.client.get("/fhir/AuditEvent?_format=application/fhir%2Bndjson", headers=headers)
    assert export.status_code == 200
    assert export.headers["content-type"].startswith("application/fhir+ndjson")
    lines = [line for line in export.text.splitlines() if line]
    assert len(lines) >= 5
    for line in lines:
        AuditEvent.model_validate_json(line)


def test_checkpoint_key_and_proofs(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    headers = auditor_headers(service)
    service.token(clinic)
    first = seal(service)
    for _ in range(4):
        service.token(clinic)
    second = seal(service)
    assert 0 < first < second

    vkey = service.client.get("/audit/key", headers=headers).text.strip()
    verifier = NoteVerifier.from_vkey(vkey)
    note = service.client.get("/audit/checkpoint", headers=headers).text
    latest = Checkpoint.parse(verifier.verify(note))
    assert latest.size == second and latest.origin == service.settings.deployment_name

    proof = service.client.get(f"/audit/proof/consistency?from={first}&to={second}", headers=headers).json()
    old = Checkpoint.parse(verifier.verify(proof_checkpoint(service, headers, first)))
    new = Checkpoint.parse(verifier.verify(proof["checkpoint"]))
    merkle.verify_consistency(
        first, second, [base64.b64decode(h) for h in proof["proof"]], old.root_hash, new.root_hash
    )

    entry = service.client.get("/fhir/AuditEvent?_count=1", headers=headers).json()["entry"][0]["resource"][
        "id"
    ]
    inclusion = service.client.get(f"/audit/proof/inclusion?entry={entry}", headers=headers).json()
    merkle.verify_inclusion(
        inclusion["index"],
        inclusion["size"],
        base64.b64decode(inclusion["leafHash"]),
        [base64.b64decode(h) for h in inclusion["proof"]],
        Checkpoint.parse(verifier.verify(inclusion["checkpoint"])).root_hash,
    )
    too_big = service.client.get(f"/audit/proof/consistency?from=1&to={second + 10}", headers=headers)
    assert too_big.status_code == 400 and too_big.json()["resourceType"] == "OperationOutcome"


def proof_checkpoint(service: Service, headers: dict[str, str], size: int) -> str:
    page = service.client.get(f"/audit/checkpoints?after={size - 1}&_count=1", headers=headers).json()
    note: str = page["checkpoints"][0]["note"]
    return note


_FAIL_TRIGGERS = {
    "sqlite": [
        "CREATE TRIGGER audit_fail BEFORE INSERT ON audit_entries "
        "BEGIN SELECT RAISE(ABORT, 'audit down'); END"
    ],
    "postgresql": [
        "CREATE OR REPLACE FUNCTION audit_fail() RETURNS trigger AS $$ "
        "BEGIN RAISE EXCEPTION 'audit down'; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER audit_fail BEFORE INSERT ON audit_entries FOR EACH ROW EXECUTE FUNCTION audit_fail()",
    ],
}


def _set_failing(url: str, failing: bool) -> None:
    engine = sa.create_engine(sync_url(url))
    with engine.begin() as conn:
        if failing:
            for statement in _FAIL_TRIGGERS[engine.dialect.name]:
                conn.execute(sa.text(statement))
        else:
            conn.execute(
                sa.text(
                    "DROP TRIGGER IF EXISTS audit_fail"
                    + (" ON audit_entries" if engine.dialect.name == "postgresql" else "")
                )
            )
    engine.dispose()


def test_audit_insert_failure_fails_the_request_and_returns_nothing(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    headers = auditor_headers(service)
    before = count_entries(service.settings.database_url)
    client = service.client
    # See the 500 the caller gets instead of the server-side exception (same app, same event loop).
    client._transport.raise_server_exceptions = False  # type: ignore[attr-defined]
    _set_failing(service.settings.database_url, True)
    try:
        token = client.post(
            "/auth/token",
            data={
                "grant_type": "client_credentials",
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": service.assertion(clinic),
                "scope": clinic.scopes,
            },
        )
        assert token.status_code == 500
        assert "access_token" not in token.text
        search = client.get("/fhir/AuditEvent", headers=headers)
        assert search.status_code == 500
        body: Any = search.json()
        assert body["resourceType"] == "OperationOutcome" and "entry" not in body
    finally:
        _set_failing(service.settings.database_url, False)
        client._transport.raise_server_exceptions = True  # type: ignore[attr-defined]
    assert count_entries(service.settings.database_url) == before
    # And the assertion was not used up: the refused grant left nothing behind.
    assert service.client.get("/fhir/AuditEvent", headers=headers).status_code == 200


@pytest.mark.parametrize("n", [3])
def test_disclosure_free_requests_leave_no_patient_refs(service: Service, n: int) -> None:
    clinic = service.register("clinic", "clinic")
    for _ in range(n):
        service.token(clinic)
    engine = sa.create_engine(sync_url(service.settings.database_url))
    with engine.connect() as conn:
        kinds = {r[0] for r in conn.execute(sa.text("SELECT DISTINCT kind FROM audit_refs"))}
    engine.dispose()
    assert "patient" not in kinds

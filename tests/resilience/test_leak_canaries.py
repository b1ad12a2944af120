"""Leak canaries: exams whose names, identifiers and results are unique canary strings go through
the flows (and the error paths) with every log captured; no canary, token or key material may
appear in a log line, an error body, a metric label or a logged URL. Then the backup: a pg_dump
of the populated database holds no canary, and a restore without the keyring decrypts nothing."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from mhr_testkit import Service
from resilience_kit import REFUGEE_EXAMPLE, ServerProcess, unique_bundle

from security.keys import LocalKeyring
from service.keys.keyring_match import KeyringMismatch
from service.records.subject_keys import SubjectKeys

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def _canaries() -> dict[str, str]:
    tag = uuid.uuid4().hex[:10].upper()
    return {
        "family": f"Canaryfam{tag}",
        "given": f"Canarygiv{tag}",
        "passport": f"CP{tag}",
        "unhcr": "945-21C04817",  # replaced below by a unique value
        "note": f"canary-note-{tag}",
    }


def _canary_bundle(c: dict[str, str]) -> dict[str, Any]:
    bundle, _ = unique_bundle(
        REFUGEE_EXAMPLE,
        passport=c["passport"],
        replace={"Al-Hassan": c["family"], "Omar": c["given"]},
    )
    for entry in bundle["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] == "Patient":
            for identifier in resource["identifier"]:
                if identifier["value"].startswith("945-21C04817"):
                    c["unhcr"] = identifier["value"]
        if resource["resourceType"] == "Observation" and "valueString" not in resource:
            resource["note"] = [{"text": c["note"]}]
            break
    return bundle


def _secrets(tmp_path: Path) -> list[str]:
    keyring = json.loads((tmp_path / "keyring.json").read_text())
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str) and len(node) >= 16:
            found.append(node)

    walk(keyring)
    # The KEK's id names the key, it is not the key: the database records it (key_checks) so
    # that a service started with another keyring refuses to.
    return [x for x in found if x != keyring["kek"]["key_id"]]


def test_no_canary_token_or_key_in_logs_errors_metrics_or_backups(
    server: ServerProcess, registry: Service, pg_database: str, tmp_path: Path
) -> None:
    clinic = registry.register("clinic", "clinic")
    authority = registry.register("authority A", "authority", purposes=("PUBHLTH",), org_id="authority-a")
    server.start()
    c = _canaries()
    clinic_token = server.token(clinic)
    authority_token = server.token(authority, purpose="PUBHLTH")
    bodies: list[str] = []
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        ch = {"Authorization": f"Bearer {clinic_token}", "Content-Type": "application/fhir+json"}
        ah = {"Authorization": f"Bearer {authority_token}"}
        reply = client.post("/fhir", content=json.dumps(_canary_bundle(c)), headers=ch)
        assert reply.status_code == 200, reply.text
        patient = reply.json()["entry"][0]["response"]["location"].split("/")[1]
        # The flows: search by identifier (GET puts it in the URL: the access log must not),
        # read, $everything, history, an authority's consented read.
        passport = f"http://hl7.org/fhir/sid/passport-SYR|{c['passport']}"
        found = client.get("/fhir/Patient", params={"identifier": passport}, headers=ch)
        assert found.json()["total"] == 1
        form = {**ch, "Content-Type": "application/x-www-form-urlencoded"}
        assert (
            client.post("/fhir/Patient/_search", data={"identifier": passport}, headers=form).status_code
            == 200
        )
        read = client.get(f"/fhir/Patient/{patient}", headers=ch)
        assert c["family"] in read.text  # the data is there for those allowed to see it
        client.get(f"/fhir/Patient/{patient}/$everything", headers=ch)
        client.get(f"/fhir/Patient/{patient}/_history", headers=ch)
        client.get(f"/fhir/Patient/{patient}/$everything", headers=ah)
        # Error paths carrying canaries: invalid resources, bad searches, bad ids, bad tokens.
        bad = _canary_bundle(c)
        bad["entry"][0]["resource"]["birthDate"] = f"{c['note']}-not-a-date"
        bad["entry"][0]["resource"]["gender"] = c["family"]
        bad_patient = json.dumps(
            {"resourceType": "Patient", "name": [{"family": c["family"]}], "unknownElement": 1}
        )
        errors = [
            client.post("/fhir", content=json.dumps(bad), headers=ch),
            client.post("/fhir/Patient", content=bad_patient, headers=ch),
            client.post("/fhir", content=json.dumps(bad).replace("{", "[", 3), headers=ch),
            client.get("/fhir/Patient", params={"identifier": c["passport"]}, headers=ch),
            client.get("/fhir/Patient", params={"unknown-param": c["family"]}, headers=ch),
            # A passport typed as an id: the refusal's audit entry keeps only a keyed hash of it.
            client.get(f"/fhir/Patient/{c['passport']}", headers=ch),
            client.get(f"/fhir/Patient/{c['passport']}", headers={"Authorization": f"Bearer {c['family']}"}),
            client.get(f"/fhir/{c['family']}/{c['passport']}", headers=ch),
            client.put(
                f"/fhir/Patient/{patient}",
                content=json.dumps({"resourceType": "Patient", "id": c["passport"]}),
                headers=ch,
            ),
        ]
        for response in errors:
            assert response.status_code >= 400
            bodies.append(response.text)
        metrics = client.get("/metrics").text
    server.stop()
    log = server.log_path.read_text()
    secrets = [clinic_token, authority_token, *_secrets(tmp_path)]
    canaries = [v for v in c.values()]
    findings = {
        "log": [x for x in canaries + secrets if x in log],
        "error bodies": [x for x in canaries + secrets for b in bodies if x in b],
        "metrics": [x for x in canaries + secrets if x in metrics],
    }
    # Logged URLs: every access line names a route template, never a raw path or query.
    for line in log.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            assert "?" not in str(entry.get("route", "")) and "path" not in entry and "url" not in entry

    # Backup exposure: pg_dump of the populated database.
    dump = tmp_path / "backup.sql"
    url = sa.engine.make_url(pg_database)
    subprocess.run(
        [
            "pg_dump",
            "-h",
            url.host or "127.0.0.1",
            "-p",
            str(url.port or 5432),
            "-U",
            url.username or "postgres",
            "--no-owner",
            "-f",
            str(dump),
            url.database or "postgres",
        ],
        check=True,
        timeout=120,
    )
    dumped = dump.read_bytes()
    encodings = [x.encode() for x in canaries] + [x.encode("utf-16-le") for x in canaries]
    encodings += [base64.b64encode(x.encode())[:12] for x in canaries]
    findings["pg_dump"] = [x.decode(errors="replace") for x in encodings if x in dumped]
    findings["pg_dump secrets"] = [x for x in secrets[2:] if x.encode() in dumped]
    total = sum(len(v) for v in findings.values())
    print("\nleak canaries:", json.dumps({"canaries": len(canaries), "found": total, "where": findings}))
    assert total == 0, findings

    # Restore it elsewhere and serve it with a fresh keyring (the backup without the keys).
    restored = f"mhr_restore_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(
        f"postgresql+psycopg://{url.username}@{url.host}:{url.port or 5432}/postgres",
        isolation_level="AUTOCOMMIT",
    )
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{restored}"'))
    try:
        restored_url = url.set(database=restored).render_as_string(hide_password=False)
        subprocess.run(
            [
                "psql",
                "-q",
                "-h",
                url.host or "127.0.0.1",
                "-p",
                str(url.port or 5432),
                "-U",
                url.username or "postgres",
                "-d",
                restored,
                "-v",
                "ON_ERROR_STOP=1",
                "-f",
                str(dump),
            ],
            check=True,
            timeout=120,
            capture_output=True,
        )
        other = tmp_path / "elsewhere"
        other.mkdir()
        # A service given the restored data and a keyring of its own refuses to start at all:
        # the database names the keys its data needs.
        with (
            pytest.raises(KeyringMismatch, match="does not hold the kek key"),
            Service.start(restored_url, other),
        ):
            pass
        # And at the crypto layer: no subject key unwraps under the new keyring.
        keys = SubjectKeys(LocalKeyring.load(other / "keyring.json"))  # the refused service's own
        engine = sa.create_engine(
            f"postgresql+psycopg://{url.username}@{url.host}:{url.port or 5432}/{restored}"
        )
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, wrapped_key, key_version FROM subjects")).all()
        engine.dispose()
        decrypted = 0
        for subject_id, wrapped, _version in rows:
            try:
                keys.cipher(subject_id, bytes(wrapped), _version)
                decrypted += 1
            except Exception:  # noqa: S112 - every failure is the expected outcome
                continue
        print("restore without keyring:", json.dumps({"subjects": len(rows), "decrypted": decrypted}))
        assert rows and decrypted == 0
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{restored}" WITH (FORCE)'))
        admin.dispose()
    shutil.rmtree(tmp_path / "elsewhere", ignore_errors=True)

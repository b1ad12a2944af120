"""API fuzzing with schemathesis against the OpenAPI document of a real server.

Every check, with every role's token (two clinics and two authorities are the object-level-
authorization peers: none may read what another one owns), on a populated PostgreSQL database.
Bounded: a few examples per operation per role, so the whole run stays within minutes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest
from mhr_testkit import Service
from resilience_kit import REFUGEE_EXAMPLE, ServerProcess, unique_bundle

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

MAX_EXAMPLES = 6
# Identities that must never see each other's objects. Authority A is not one: the exams'
# consent names it, so it may read both clinics' submissions (that is the point).
PEERS = ["clinic-a", "clinic-b", "authority-b"]
# FHIR profiles and signed client assertions are more than a JSON Schema can say: a schema-valid
# but profile-invalid resource is a 400/422, an unverifiable assertion a 400/401 (RFC 6749).
ACCEPTED_REFUSALS = ["2XX", "3XX", "400", "401", "403", "404", "409", "412", "422", "429"]
ROLES = ["clinic-a", "clinic-b", "authority-a", "authority-b", "auditor", "admin"]


def _seed(server: ServerProcess, registry: Service) -> tuple[dict[str, str], dict[str, str]]:
    parties = {
        "clinic-a": registry.register("clinic A", "clinic"),
        "clinic-b": registry.register("clinic B", "clinic"),
        "authority-a": registry.register(
            "authority A", "authority", purposes=("PUBHLTH",), org_id="authority-a"
        ),
        "authority-b": registry.register(
            "authority B", "authority", purposes=("PUBHLTH",), org_id="authority-b"
        ),
        "auditor": registry.register("auditor", "auditor"),
        "admin": registry.register("admin", "admin"),
    }
    tokens = {}
    for name, party in parties.items():
        purpose = "PUBHLTH" if party.role == "authority" else None
        tokens[name] = server.token(party, purpose=purpose)
    patients = {}
    for clinic in ("clinic-a", "clinic-b"):
        for _ in range(2):
            bundle, _ = unique_bundle(REFUGEE_EXAMPLE)
            reply = httpx.post(
                f"{server.base_url}/fhir",
                content=json.dumps(bundle),
                headers={
                    "Authorization": f"Bearer {tokens[clinic]}",
                    "Content-Type": "application/fhir+json",
                },
                timeout=30,
            )
            assert reply.status_code == 200, reply.text
            patients[clinic] = reply.json()["entry"][0]["response"]["location"].split("/")[1]
    # Real ids, so that reads reach stored objects and the authorization check has something to probe.
    parameters = {
        "path.resource_type": "Patient",
        "path.resource_id": patients["clinic-a"],
        "path.patient_id": patients["clinic-b"],
        "path.version_id": "1",
        "path.org_id": parties["clinic-a"].organization_id,
    }
    return tokens, parameters


def _run_schemathesis(
    server: ServerProcess, tmp_path: Path, tokens: dict[str, str], user: str, parameters: dict[str, str]
) -> dict[str, int]:
    wfc = tmp_path / "wfc-auth.json"
    wfc.write_text(
        json.dumps(
            {
                "auth": [
                    {"name": name, "fixedHeaders": [{"name": "Authorization", "value": f"Bearer {token}"}]}
                    for name, token in tokens.items()
                ]
            }
        )
    )
    config = tmp_path / f"schemathesis-{user}.toml"
    params = "".join(f'"{k}" = "{v}"\n' for k, v in parameters.items())
    config.write_text(
        f'[auth.wfc]\npath = "{wfc}"\nuser = "{user}"\npeers = {json.dumps(PEERS)}\n'
        f"[checks.positive_data_acceptance]\nexpected-statuses = {json.dumps(ACCEPTED_REFUSALS)}\n"
        f"[parameters]\n{params}"
    )
    junit = tmp_path / f"junit-{user}.xml"
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")),
            "--config-file",
            str(config),
            "run",
            f"{server.base_url}/openapi.json",
            "--checks",
            "all",
            # Allow lists every method the router accepts at a path; at /fhir/Organization that
            # includes the generic POST /fhir/{resource_type} (which answers 404 for that type),
            # which the schema documents under the template path, not under the literal one.
            "--exclude-checks",
            "allow_header_conformance",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--phases",
            "examples,coverage,fuzzing",
            "--seed",
            "7",
            "--report",
            "junit",
            "--report-junit-path",
            str(junit),
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    (tmp_path / f"schemathesis-{user}.out").write_text(result.stdout + result.stderr)
    tree = ET.parse(junit)  # noqa: S314
    cases = failures = errors = 0
    for suite in tree.iter("testsuite"):
        cases += int(suite.get("tests", 0))
        failures += int(suite.get("failures", 0))
        errors += int(suite.get("errors", 0))
    generated = re.search(r"(\d+) generated", result.stdout)
    return {
        "operations": cases,
        "cases": int(generated.group(1)) if generated else 0,
        "failures": failures,
        "errors": errors,
        "exit": result.returncode,
    }


def test_schemathesis_every_check_every_role(
    server: ServerProcess, registry: Service, tmp_path: Path
) -> None:
    server.start()
    tokens, parameters = _seed(server, registry)
    results = {user: _run_schemathesis(server, tmp_path, tokens, user, parameters) for user in ROLES}
    print("\nschemathesis:", json.dumps(results))
    outputs = {user: (tmp_path / f"schemathesis-{user}.out").read_text() for user in ROLES}
    for user, result in results.items():
        assert result["failures"] == 0 and result["errors"] == 0 and result["exit"] == 0, outputs[user][
            -6000:
        ]

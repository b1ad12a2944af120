"""Helpers for the Bulk Data export tests: a migrant world, kick-off, polling, downloading."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import sqlalchemy as sa
from mhr_testkit import EXAMPLES, FHIR_HEADERS, Party, Service, load_example, submit, sync_url
from test_disclosure import World, consent

ASYNC = {"Prefer": "respond-async"}


def authority_headers(service: Service, party: Party, purpose: str = "PUBHLTH") -> dict[str, str]:
    return service.headers(party, purpose_of_use=purpose)


def add_migrant(service: Service, clinic: Party, example: int) -> str:
    """Submit one example exam (a fresh migrant); returns the Patient id."""
    bundle = load_example(EXAMPLES[example])
    bundle["entry"] = [e for e in bundle["entry"] if e["resource"]["resourceType"] != "Consent"]
    # A fresh migrant: identifiers no earlier submission carries.
    text = json.dumps(bundle)
    for entry in bundle["entry"]:
        for identifier in entry["resource"].get("identifier", []):
            value = identifier.get("value")
            if isinstance(value, str) and len(value) >= 4:
                text = text.replace(value, f"{value}X{uuid.uuid4().hex[:8].upper()}")
    fresh = json.loads(text)
    if "identifier" in fresh:
        fresh["identifier"]["value"] = f"urn:uuid:{uuid.uuid4()}"
    reply = submit(service, clinic, fresh)
    assert reply.status_code == 200, reply.text
    locations = [e["response"]["location"].split("/")[:2] for e in reply.json()["entry"]]
    return next(i for t, i in locations if t == "Patient")


def permit(world: World, patient_id: str, organization_id: str) -> str:
    return world.post_consent(consent(patient_id, organization_id))


def kick_off(
    service: Service,
    headers: dict[str, str],
    path: str = "/fhir/$export",
    params: dict[str, str] | None = None,
    extra: dict[str, str] | None = None,
) -> Any:
    return service.client.get(path, params=params or {}, headers={**ASYNC, **headers, **(extra or {})})


def status_path(response: Any) -> str:
    assert response.status_code == 202, response.text
    location = response.headers["Content-Location"]
    assert location.startswith("http://testserver/fhir/_bulk/status/")
    return location.removeprefix("http://testserver")


def wait_for_manifest(service: Service, headers: dict[str, str], path: str, seconds: float = 90) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        response = service.client.get(path, headers=headers)
        if response.status_code == 200:
            return response.json()
        assert response.status_code == 202, response.text
        assert response.headers["Retry-After"].isdigit()
        assert "X-Progress" in response.headers
        assert time.monotonic() < deadline, "the export did not complete"
        time.sleep(0.1)


def download(service: Service, headers: dict[str, str], url: str) -> list[dict[str, Any]]:
    response = service.client.get(url.removeprefix("http://testserver"), headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+ndjson")
    return [json.loads(line) for line in response.text.splitlines() if line]


def everything_exported(service: Service, headers: dict[str, str], manifest: dict[str, Any]) -> list[Any]:
    found = []
    for item in manifest["output"]:
        resources = download(service, headers, item["url"])
        assert len(resources) == item["count"]
        assert {r["resourceType"] for r in resources} == {item["type"]}
        found.extend(resources)
    return found


def export_disclosures(service: Service) -> list[dict[str, Any]]:
    engine = sa.create_engine(sync_url(service.settings.database_url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT content FROM audit_entries WHERE event_type = 'disclosure' AND subtype = 'export'"
                )
            ).scalars()
            return [json.loads(bytes(row)) for row in rows]
    finally:
        engine.dispose()


__all__ = ["FHIR_HEADERS", "World"]

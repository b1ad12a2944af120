"""What an auditor relies on: newest entries first, and a migrant's disclosures over the API."""

from __future__ import annotations

from typing import Any

from mhr_testkit import EXAMPLES, Party, Service, load_example
from test_disclosure import World, consent, world

__all__ = ["world"]  # the fixture, shared with the disclosure tests

AUDIT_SCOPE = "system/AuditEvent.rs"


def _auditor(service: Service) -> Party:
    return service.parties.get("auditor") or service.register("auditor", "auditor")


def _pages(service: Service, url: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while url:
        reply = service.client.get(url, headers=headers)
        assert reply.status_code == 200, reply.text
        bundle = reply.json()
        events += [e["resource"] for e in bundle.get("entry", [])]
        url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), "")
    return events


def test_audit_events_sorted_by_date_both_ways_across_pages(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    for _ in range(5):
        service.token(clinic)
    headers = service.headers(_auditor(service), AUDIT_SCOPE)
    query = f"/fhir/AuditEvent?agent={clinic.client_id}&_count=2"
    newest = _pages(service, f"{query}&_sort=-date", headers)
    oldest = _pages(service, f"{query}&_sort=date", headers)
    log_order = _pages(service, query, headers)
    assert len(newest) == len(oldest) == len(log_order) >= 5
    key = [(e["recorded"], int(e["id"])) for e in oldest]
    assert key == sorted(key)
    assert [e["id"] for e in newest] == [e["id"] for e in reversed(oldest)]
    assert {e["id"] for e in log_order} == {e["id"] for e in newest}
    # Page links keep the order they were asked for.
    first = service.client.get(f"{query}&_sort=-date", headers=headers).json()
    next_url = next(link["url"] for link in first["link"] if link["relation"] == "next")
    assert "_sort=-date" in next_url
    export = service.client.get(
        f"/fhir/AuditEvent?agent={clinic.client_id}&_sort=-date&_format=ndjson", headers=headers
    )
    assert [line.split('"id":"')[1].split('"')[0] for line in export.text.splitlines() if line] == [
        e["id"] for e in newest
    ]
    for bad in ("_sort=recorded", "_sort=-date&_cursor=nonsense", "_cursor=-1", "_sort=date&_cursor=1.x"):
        refused = service.client.get(f"/fhir/AuditEvent?{bad}", headers=headers)
        assert refused.status_code == 400, bad
        assert refused.json()["resourceType"] == "OperationOutcome"


def test_auditor_lists_a_migrants_disclosures_and_is_audited(world: World) -> None:
    service = world.service
    consent_id = world.post_consent(consent(world.patient, world.authority.organization_id))
    authority = service.headers(world.authority, purpose_of_use="PUBHLTH")
    assert service.client.get(f"/fhir/Patient/{world.patient}", headers=authority).status_code == 200
    auditor = _auditor(service)
    headers = service.headers(auditor, AUDIT_SCOPE)
    path = f"/fhir/Patient/{world.patient}/$disclosures"

    listing = service.client.get(path, headers=headers)
    assert listing.status_code == 200, listing.text
    clinic_view = service.client.get(path, headers=service.headers(world.clinic)).json()
    assert listing.json() == clinic_view  # one accounting, whoever asks
    (disclosure,) = listing.json()["parameter"]
    parts = {p["name"]: p for p in disclosure["part"]}
    recipient = parts["recipient"]["valueReference"]["reference"]
    assert recipient == f"Organization/{world.authority.organization_id}"
    assert parts["consent"]["valueReference"]["reference"] == f"Consent/{consent_id}/_history/1"
    # Pseudonymous ids and codes only: nothing of the record itself.
    entries = load_example(EXAMPLES[1])["entry"]
    patient = next(e["resource"] for e in entries if e["resource"]["resourceType"] == "Patient")
    for name in patient["name"]:
        assert name["family"] not in listing.text
    assert patient["identifier"][0]["value"] not in listing.text

    # The auditor's look is itself on the record, naming the migrant's pseudonym.
    reviewed = service.client.get(
        f"/fhir/AuditEvent?agent={auditor.client_id}&patient={world.patient}&_sort=-date", headers=headers
    ).json()
    subtypes = [c["code"] for e in reviewed["entry"] for c in e["resource"]["subtype"]]
    assert "disclosures" in subtypes

    # An id the log knows nothing about is an empty accounting (the auditor sees the log, not
    # the records), valid FHIR: no empty array.
    unknown = service.client.get("/fhir/Patient/no-such-migrant/$disclosures", headers=headers)
    assert unknown.status_code == 200 and unknown.json() == {"resourceType": "Parameters"}
    # The role still reads no clinical data, and needs the audit scope for this.
    assert service.client.get(f"/fhir/Patient/{world.patient}", headers=headers).status_code == 403
    narrow = service.headers(auditor, "system/Organization.rs")
    assert service.client.get(path, headers=narrow).status_code == 403

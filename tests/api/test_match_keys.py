"""ifNoneExist keys (``match_keys``): claimed without a SAVEPOINT, taken over, or lost cleanly."""

from __future__ import annotations

import asyncio
import copy
import json

import pytest
import sqlalchemy as sa
from mhr_testkit import EXAMPLES, FHIR_HEADERS, Party, Service, load_example, submit, sync_url

from service.records.repository import RecordRepository
from service.store.database import Database


@pytest.fixture
def clinic(service: Service) -> Party:
    return service.register("clinic", "clinic")


def _keys(database_url: str) -> list[tuple[str, bytes, str]]:
    engine = sa.create_engine(sync_url(database_url))
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT organization_id, identifier_hash, resource_id FROM match_keys "
                "WHERE resource_type = 'Patient'"
            )
        ).all()
    engine.dispose()
    return [(r[0], bytes(r[1]), r[2]) for r in rows]


def _patient(reply: object) -> str:
    for entry in reply.json()["entry"]:  # type: ignore[attr-defined]
        location = entry["response"]["location"]
        if location.startswith("Patient/"):
            return str(location.split("/")[1])
    raise AssertionError("no Patient in the reply")


def test_a_key_whose_migrant_no_longer_carries_the_identifier_is_taken_over(
    service: Service, clinic: Party, database_url: str
) -> None:
    bundle = load_example(EXAMPLES[0])
    first = _patient(submit(service, clinic, bundle))
    [(_, key, holder)] = _keys(database_url)
    assert holder == first
    # The passport was a typo: the migrant is corrected to another one.
    headers = service.headers(clinic)
    current = service.client.get(f"/fhir/Patient/{first}", headers=headers).json()
    corrected = copy.deepcopy(current)
    corrected["identifier"][0]["value"] = "ZX0000002"
    response = service.client.put(
        f"/fhir/Patient/{first}", content=json.dumps(corrected), headers={**headers, **FHIR_HEADERS}
    )
    assert response.status_code == 200, response.text
    # The old passport now names nobody: submitting it again (as a new exam: no Bundle.identifier,
    # which would replay the first submission) makes a new migrant who takes the key.
    resubmitted = load_example(EXAMPLES[0])
    del resubmitted["identifier"]
    again = submit(service, clinic, resubmitted)
    assert again.status_code == 200, again.text
    second = _patient(again)
    assert second != first
    assert _keys(database_url) == [(clinic.organization_id, key, second)]


def test_a_lost_claim_leaves_nothing_behind(service: Service, clinic: Party, database_url: str) -> None:
    held_by = _patient(submit(service, clinic, load_example(EXAMPLES[0])))
    [(org, held, _)] = _keys(database_url)
    fresh = bytes(32)

    async def claim() -> bool:
        database = Database(database_url)
        try:
            async with database.transaction() as session:
                repo = RecordRepository(session)
                return await repo.claim_match_keys(
                    org, {("Patient", fresh): "new-a", ("Patient", held): "new-b"}
                )
        finally:
            await database.dispose()

    assert asyncio.run(claim()) is False
    # The fresh key claimed in the same statement was taken back; the held one is untouched.
    assert _keys(database_url) == [(org, held, held_by)]


def test_claiming_free_keys(service: Service, clinic: Party, database_url: str) -> None:
    async def claim() -> bool:
        database = Database(database_url)
        try:
            async with database.transaction() as session:
                repo = RecordRepository(session)
                return await repo.claim_match_keys(
                    "org-x", {("Patient", b"\x01" * 32): "p1", ("Patient", b"\x02" * 32): "p2"}
                )
        finally:
            await database.dispose()

    assert asyncio.run(claim()) is True
    assert sorted(_keys(database_url)) == [("org-x", b"\x01" * 32, "p1"), ("org-x", b"\x02" * 32, "p2")]

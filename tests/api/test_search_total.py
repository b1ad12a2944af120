"""An authority's search total is exact and counts only what consent lets it see.

The total on a search's first page is counted apart from the page: from the counts kept
with the grants (migration 0011_h_read_perf, tests/api/test_kept_total.py) or, for other
filters, by its own statement (over covering indexes, migration 0010_h_bench). These tests hold the count to
what the pages disclose: withheld labels, withdrawn consent and another authority's
consent are never counted, and every counted resource is one the authority receives.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from mhr_testkit import EXAMPLES, Party, load_example, submit
from sqlalchemy import bindparam as sa_bindparam
from sqlalchemy import text
from test_disclosure import World, consent, make_world

from service.records.grant_predicate import GrantFilter
from service.records.repository import RecordRepository, SearchFilter
from service.store.database import Database

SINCE = {"_lastUpdated": "gt2020-01-01T00:00:00Z"}


def _exam(world: World, example: int) -> dict[str, list[str]]:
    """Submit one example exam from the world's clinic; its resource ids by type."""
    reply = submit(world.service, world.clinic, load_example(EXAMPLES[example]))
    assert reply.status_code == 200, reply.text
    ids: dict[str, list[str]] = {}
    for entry in reply.json()["entry"]:
        resource_type, resource_id = entry["response"]["location"].split("/")[:2]
        ids.setdefault(resource_type, []).append(resource_id)
    return ids


def _walk(world: World, party: Party, resource_type: str, **params: str) -> tuple[int, list[str]]:
    """The first page's total, and every id on every page (two a page, by next links)."""
    headers = world.service.headers(party, purpose_of_use="PUBHLTH")
    page: Any = world.service.client.get(
        f"/fhir/{resource_type}", params={**params, "_count": "2"}, headers=headers
    ).json()
    assert page["resourceType"] == "Bundle", page
    total = page["total"]
    seen = []
    while True:
        seen += [e["resource"]["id"] for e in page.get("entry", [])]
        following = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
        if following is None:
            return total, seen
        page = world.service.client.get(following, headers=headers).json()


def _summary_count(world: World, party: Party, resource_type: str) -> int:
    response = world.service.client.get(
        f"/fhir/{resource_type}",
        params={**SINCE, "_summary": "count"},
        headers=world.service.headers(party, purpose_of_use="PUBHLTH"),
    )
    assert response.status_code == 200, response.text
    assert "entry" not in response.json()
    return int(response.json()["total"])


@pytest.fixture
def three_migrants(world: World) -> tuple[World, dict[str, list[str]], dict[str, list[str]]]:
    """The world's migrant (an HIV test among its Observations) consents to authority A without
    the HIV label; a second migrant consented to A and withdrew; a third consents to B only."""
    world.post_consent(consent(world.patient, world.authority.organization_id))
    withdrawn = _exam(world, 0)
    world.withdraw(world.post_consent(consent(withdrawn["Patient"][0], world.authority.organization_id)))
    elsewhere = _exam(world, 2)
    world.post_consent(consent(elsewhere["Patient"][0], world.other.organization_id))
    return world, withdrawn, elsewhere


@pytest.fixture
def world(service: Any) -> World:
    return make_world(service)


def test_patient_total_counts_only_the_consented_migrant(
    three_migrants: tuple[World, dict[str, list[str]], dict[str, list[str]]],
) -> None:
    world, withdrawn, elsewhere = three_migrants
    for params in ({}, SINCE):
        total, seen = _walk(world, world.authority, "Patient", **params)
        assert seen == [world.patient]
        assert total == 1
    assert _summary_count(world, world.authority, "Patient") == 1
    # The other authority is counted its own migrant, and nobody else's.
    total, seen = _walk(world, world.other, "Patient", **SINCE)
    assert (total, seen) == (1, elsewhere["Patient"])
    assert withdrawn["Patient"][0] not in seen


def test_observation_total_leaves_out_the_withheld_label(
    three_migrants: tuple[World, dict[str, list[str]], dict[str, list[str]]],
) -> None:
    world, withdrawn, elsewhere = three_migrants
    total, seen = _walk(world, world.authority, "Observation", **SINCE)
    assert world.hiv_observation not in seen, "an HIV-labelled Observation needs the label in the consent"
    assert world.observation in seen
    assert total == len(seen) == len(set(seen))
    assert not set(seen) & set(withdrawn["Observation"] + elsewhere["Observation"])
    assert _summary_count(world, world.authority, "Observation") == total
    # Each counted Observation is one the authority is given when it reads it.
    headers = world.service.headers(world.authority, purpose_of_use="PUBHLTH")
    for observation_id in seen:
        read = world.service.client.get(f"/fhir/Observation/{observation_id}", headers=headers)
        assert read.status_code == 200
    other_total, other_seen = _walk(world, world.other, "Observation", **SINCE)
    assert set(other_seen) == set(elsewhere["Observation"])
    assert other_total == len(elsewhere["Observation"])


def test_total_follows_a_consent_that_adds_the_label_and_one_withdrawn(
    three_migrants: tuple[World, dict[str, list[str]], dict[str, list[str]]],
) -> None:
    world, _, _ = three_migrants
    before, _ = _walk(world, world.authority, "Observation", **SINCE)
    labelled = world.post_consent(consent(world.patient, world.authority.organization_id, labels=("HIV",)))
    after, seen = _walk(world, world.authority, "Observation", **SINCE)
    assert after == before + 1 == len(seen)
    assert world.hiv_observation in seen
    world.withdraw(labelled)
    assert _walk(world, world.authority, "Observation", **SINCE)[0] == before


def test_the_count_leaves_its_connection_planning_as_before(database_url: str) -> None:
    """The total is counted with planner settings of its own on PostgreSQL (no parallel workers,
    a plan for its own parameters); the pooled connection that served it plans the next
    request's statements with the server's own settings again."""

    async def count_then_show() -> tuple[int, list[str] | None, list[str] | None]:
        database = Database(database_url)
        try:
            async with database.reading() as session:
                repo = RecordRepository(session)
                grant = GrantFilter("no-such-authority", "PUBHLTH", datetime.now(UTC))
                # The kept total, then a search the counts kept with the grants do not answer
                # (ids): the joined statement, with the planner settings of its own.
                total = await repo.count(SearchFilter("Patient", grant=grant))
                total += await repo.count(SearchFilter("Patient", grant=grant, ids=["no-such-id"]))
                connection = await session.connection()
                if connection.dialect.name != "postgresql":
                    return total, None, None
                names = ("max_parallel_workers_per_gather", "plan_cache_mode")
                shown = [str((await connection.execute(text(f"SHOW {name}"))).scalar_one()) for name in names]
                configured = await connection.execute(
                    text(
                        "SELECT name, reset_val FROM pg_settings WHERE name IN :names ORDER BY name"
                    ).bindparams(sa_bindparam("names", expanding=True)),
                    {"names": list(names)},
                )
                return total, shown, [str(value) for _, value in configured.all()]
        finally:
            await database.dispose()

    total, shown, configured = asyncio.run(count_then_show())
    assert total == 0
    assert shown == configured

"""The counts kept with the disclosure grants stay equal to the real count.

An authority's unfiltered search total is a sum of ``disclosure_grants.current_matches``
(migration 0011_h_read_perf), so every change to either side must keep it: a Consent written,
narrowed, widened and withdrawn, a correction that moves a resource to another label set, a
relabel, an erasure. After each step these tests recount every grant independently in SQL and
hold the service's total (the kept one, and the joined statement it replaces) to the number of
resources the authority is actually given, page by page.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from mhr_testkit import FHIR_HEADERS, Party, Service, sync_url
from test_disclosure import World, consent, make_world
from test_search_total import _exam, _walk

from service.records import repository
from service.records.grant_predicate import GrantFilter
from service.records.relabel import relabel
from service.records.repository import RecordRepository, SearchFilter, _kept_total_answers
from service.store.database import Database

TYPES = ("Patient", "Observation", "Encounter", "Condition")
SINCE = datetime(2020, 1, 1, tzinfo=UTC)

_RECOUNT = """
SELECT g.id, g.current_matches, (
    SELECT count(*) FROM resource_versions v JOIN resources r
      ON r.resource_type = v.resource_type AND r.id = v.id AND r.version_id = v.version_id
    WHERE v.subject_id = g.subject_id AND v.resource_type = g.resource_type
      AND v.labels_token = g.labels_token)
FROM disclosure_grants g
"""


@pytest.fixture
def world(service: Service) -> World:
    return make_world(service)


def _recounted(world: World) -> list[tuple[int, int, int]]:
    engine = sa.create_engine(sync_url(world.service.settings.database_url))
    try:
        with engine.connect() as conn:
            return [(int(a), int(b), int(c)) for a, b, c in conn.execute(sa.text(_RECOUNT)).all()]
    finally:
        engine.dispose()


def _totals(world: World, organization_id: str) -> list[tuple[str, str, int, int]]:
    """(type, filter, kept total, joined count) for each type, unfiltered and updated-since."""

    async def count(database: Database) -> list[tuple[str, str, int, int]]:
        out = []
        async with database.reading() as session:
            repo = RecordRepository(session)
            connection = await session.connection()
            grant = GrantFilter(organization_id, "PUBHLTH", datetime.now(UTC))
            for resource_type in TYPES:
                for name, ranges in (
                    ("all", []),
                    ("gt 2020", [("gt", SINCE)]),
                    ("ge tomorrow", [("ge", datetime.now(UTC) + timedelta(days=1))]),
                ):
                    flt = SearchFilter(resource_type, grant=grant, updated_ranges=list(ranges))
                    assert _kept_total_answers(flt)
                    kept = await repo.count(flt)
                    joined = await repo._joined_count(connection, flt)
                    out.append((resource_type, name, kept, joined))
        return out

    result: list[tuple[str, str, int, int]] = world.service._run(count)
    return result


def _check(world: World) -> dict[str, int]:
    """Every grant's kept count is its real count; every total equals the joined count and what
    the authority walks through page by page. Returns A's unfiltered totals by type."""
    stale = [(grant_id, kept, real) for grant_id, kept, real in _recounted(world) if kept != real]
    assert not stale, f"grants whose kept count is not their real count: {stale}"
    by_type = {}
    for party in (world.authority, world.other):
        for resource_type, name, kept, joined in _totals(world, party.organization_id):
            assert kept == joined, (party.organization_id, resource_type, name)
            if name == "ge tomorrow":
                assert kept == 0
        for resource_type in ("Patient", "Observation"):
            walked, seen = _walk(world, party, resource_type, _lastUpdated="gt2020-01-01T00:00:00Z")
            assert walked == len(seen) == len(set(seen)), (party.organization_id, resource_type)
            if party is world.authority:
                by_type[resource_type] = walked
    return by_type


def _put(world: World, resource: dict[str, Any]) -> None:
    response = world.service.client.put(
        f"/fhir/{resource['resourceType']}/{resource['id']}",
        content=json.dumps(resource),
        headers={**FHIR_HEADERS, **world.service.headers(world.clinic)},
    )
    assert response.status_code == 200, response.text


def _erase(world: World, admins: tuple[Party, Party]) -> None:
    def post(party: Party, path: str, body: dict[str, Any] | None = None) -> Any:
        return world.service.client.post(
            path,
            content=json.dumps(body) if body is not None else None,
            headers={**FHIR_HEADERS, **world.service.headers(party)},
        )

    asked = post(
        admins[0], "/admin/erasures", {"patient": f"Patient/{world.patient}", "reason": "gdpr-art17-1b"}
    )
    assert asked.status_code == 201, asked.text
    done = post(admins[1], f"/admin/erasures/{asked.json()['id']}/approve")
    assert done.status_code == 200, done.text


def test_kept_counts_follow_consents_corrections_relabels_and_erasure(world: World) -> None:
    service = world.service
    admins = service.register("admin A", "admin"), service.register("admin B", "admin")
    assert _check(world) == {"Patient": 0, "Observation": 0}  # no consent yet

    # A Consent for A without the HIV label, and a second migrant who consents to B.
    plain = world.post_consent(consent(world.patient, world.authority.organization_id))
    elsewhere = _exam(world, 2)
    world.post_consent(consent(elsewhere["Patient"][0], world.other.organization_id))
    first = _check(world)
    assert first["Patient"] == 1 and first["Observation"] > 0

    # Widened to the HIV label: one Observation more.
    labelled = world.post_consent(consent(world.patient, world.authority.organization_id, labels=("HIV",)))
    assert _check(world)["Observation"] == first["Observation"] + 1
    world.withdraw(labelled)
    assert _check(world) == first

    # A correction that makes a plain Observation HIV-labelled: A loses it from the total.
    headers = service.headers(world.clinic)
    observation = service.client.get(f"/fhir/Observation/{world.observation}", headers=headers).json()
    observation["code"] = {"coding": [{"system": "http://loinc.org", "code": "75622-1"}]}  # HIV 1+2 Ab
    observation.pop("meta", None)
    _put(world, observation)
    corrected = _check(world)
    assert corrected["Observation"] == first["Observation"] - 1

    # Tokens written by another labeller, then `mhr records relabel`: the counts follow.
    engine = sa.create_engine(sync_url(service.settings.database_url))
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE resource_versions SET labels_token = NULL WHERE subject_id = :s"),
                {"s": world.patient},
            )
    finally:
        engine.dispose()
    runtime = service.fastapi.state.runtime  # type: ignore[attr-defined]

    async def run(database: Database) -> Any:
        return await relabel(database, runtime.records)

    service._run(run)
    assert _check(world) == corrected

    # Withdrawn: nothing of this migrant is counted for A, and B's migrant is untouched.
    world.withdraw(plain)
    assert _check(world) == {"Patient": 0, "Observation": 0}
    world.post_consent(consent(world.patient, world.authority.organization_id))
    assert _check(world) == corrected

    # Erased: the grants go, and their counts with them.
    _erase(world, admins)
    assert _check(world) == {"Patient": 0, "Observation": 0}
    assert _walk(world, world.other, "Patient")[0] == 1


def test_filters_the_kept_counts_do_not_answer_are_counted_by_the_statement() -> None:
    grant = GrantFilter("authority", "PUBHLTH", datetime.now(UTC))
    assert _kept_total_answers(SearchFilter("Patient", grant=grant))
    assert _kept_total_answers(SearchFilter("Patient", grant=grant, updated_ranges=[("ge", SINCE)]))
    for flt in (
        SearchFilter("Patient", organization_id="clinic"),  # tenancy
        SearchFilter("Patient", grant=grant, updated_ranges=[("lt", SINCE)]),
        SearchFilter("Patient", grant=grant, updated_ranges=[("gt", SINCE), ("lt", SINCE)]),
        SearchFilter("Patient", grant=grant, date_ranges=[("gt", SINCE)]),
        SearchFilter("Patient", grant=grant, ids=["a"]),
        SearchFilter("Patient", grant=grant, subject_ids=["a"]),
        SearchFilter("Patient", grant=grant, token_groups=[("identifier", [b"x"])]),
        SearchFilter("", grant=grant, resource_types=["Observation"]),
        SearchFilter("Patient", grant=grant, match_nothing=True),
    ):
        assert not _kept_total_answers(flt), flt


def test_a_long_stretch_before_the_bound_is_counted_by_the_statement(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When more than the limit lies before the bound, the search is counted directly: the same
    exact total either way."""
    world.post_consent(consent(world.patient, world.authority.organization_id))
    expected = {(t, name): kept for t, name, kept, _ in _totals(world, world.authority.organization_id)}
    monkeypatch.setattr(repository, "_COMPLEMENT_LIMIT", 1)
    for resource_type, name, kept, joined in _totals(world, world.authority.organization_id):
        assert kept == joined == expected[(resource_type, name)], (resource_type, name)
    assert expected[("Observation", "gt 2020")] > 1

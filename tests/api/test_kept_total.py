"""The counts kept with the disclosure grants stay equal to the real count.

An authority's unfiltered search total is a sum of ``disclosure_grants.current_matches``
(migration 0011_h_read_perf), so every change to either side must keep it: a Consent written,
narrowed, widened and withdrawn, a correction that moves a resource to another label set, a
relabel, an erasure. After each step these tests recount every grant independently in SQL and
hold the service's total (the kept one, and the joined statement it replaces) to the number of
resources the authority is actually given, page by page.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from mhr_testkit import FHIR_HEADERS, Party, Service, sync_url
from test_disclosure import World, consent, make_world
from test_search_total import _exam, _walk

from service.records import kept_totals, repository
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
# The live sum per key, kept in grant_totals, against the grants it stands for.
_KEPT_LIVE = """
SELECT organization_id, purpose, resource_type, sum(delta) FROM grant_totals
GROUP BY organization_id, purpose, resource_type HAVING sum(delta) <> 0
"""
_GRANTS_LIVE = """
SELECT organization_id, purpose, resource_type, sum(current_matches) FROM disclosure_grants
WHERE retired_at IS NULL AND current_matches > 0 GROUP BY organization_id, purpose, resource_type
"""


@pytest.fixture
def world(service: Service) -> World:
    return make_world(service)


def _query(world: World, sql: str) -> list[tuple[Any, ...]]:
    engine = sa.create_engine(sync_url(world.service.settings.database_url))
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text(sql)).all()]
    finally:
        engine.dispose()


def _recounted(world: World) -> list[tuple[int, int, int]]:
    return [(int(a), int(b), int(c)) for a, b, c in _query(world, _RECOUNT)]


def _live_sums(world: World, sql: str) -> dict[tuple[str, str, str], int]:
    return {(o, p, t): int(n) for o, p, t, n in _query(world, sql)}


def _maintain(world: World, now: datetime | None = None) -> int:
    async def run(database: Database) -> int:
        return await kept_totals.maintain(database, now or datetime.now(UTC))

    retired: int = world.service._run(run)
    return retired


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
    assert _live_sums(world, _KEPT_LIVE) == _live_sums(world, _GRANTS_LIVE)
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


def test_grants_not_begun_or_ended_are_left_out_before_and_after_the_sweep(world: World) -> None:
    """A Consent that ended yesterday and one that begins next week: their grants admit resources
    (their counts are live) but not now. The total leaves them out while the sweep has not run,
    and after it has retired the ended ones; folding the additions changes no total."""
    authority = world.authority.organization_id
    world.post_consent(consent(world.patient, authority, start=-60, end=-1))
    ahead = _exam(world, 2)["Patient"][0]
    world.post_consent(consent(ahead, authority, start=7, end=90))
    in_force = _exam(world, 0)["Patient"][0]
    world.post_consent(consent(in_force, authority))
    assert _check(world)["Patient"] == 1  # only the migrant whose Consent is in force

    live_before = _live_sums(world, _KEPT_LIVE)
    assert live_before[(authority, "PUBHLTH", "Patient")] == 3  # all three grants count as live
    assert _maintain(world) > 0  # the grants that ended yesterday are retired
    assert _live_sums(world, _KEPT_LIVE)[(authority, "PUBHLTH", "Patient")] == 2
    assert _check(world)["Patient"] == 1
    assert not _maintain(world)  # nothing more has ended
    rows = _query(
        world,
        "SELECT organization_id, purpose, resource_type, count(*) FROM grant_totals "
        "GROUP BY organization_id, purpose, resource_type HAVING count(*) > 1",
    )
    assert not rows, f"additions not folded: {rows}"

    # A correction of the retired migrant's exam changes its grants' counts, not the live sums.
    headers = world.service.headers(world.clinic)
    observation = world.service.client.get(f"/fhir/Observation/{world.observation}", headers=headers).json()
    observation.pop("meta", None)
    observation["status"] = "amended"
    _put(world, observation)
    assert _check(world)["Patient"] == 1

    # A sweep as of next month retires nothing that has not ended by then: the Consent that
    # begins next week stays live, and today's total still leaves it out.
    assert not _maintain(world, datetime.now(UTC) + timedelta(days=30))
    assert _check(world)["Patient"] == 1


def test_concurrent_recounts_and_sweeps_lose_no_change(world: World) -> None:
    """Writers recount grants of several migrants at once while sweeps and folds run beside
    them (on PostgreSQL: row locks, READ COMMITTED): the kept live sums stay the grants' own."""
    authority = world.authority.organization_id
    patients = [world.patient] + [_exam(world, i)["Patient"][0] for i in (0, 2, 3)]
    for index, patient in enumerate(patients):
        world.post_consent(consent(patient, authority, start=-60, end=-1 if index % 2 else 365))

    async def churn(database: Database) -> None:
        async def recount(patient: str) -> None:
            for _ in range(15):
                async with database.transaction() as session:
                    await RecordRepository(session).refresh_grant_matches([patient, patients[0]])

        async def sweep() -> None:
            for _ in range(15):
                await kept_totals.maintain(database, datetime.now(UTC))

        # Counts that moved under the writers' feet: zero every grant's count first, so that
        # each recount changes it back and every writer has a change to record.
        async with database.transaction() as session:
            await session.execute(sa.text("UPDATE disclosure_grants SET current_matches = 0"))
            await session.execute(sa.text("DELETE FROM grant_totals"))
        await asyncio.gather(*(recount(p) for p in patients), sweep(), sweep())

    world.service._run(churn)
    assert _live_sums(world, _KEPT_LIVE) == _live_sums(world, _GRANTS_LIVE)
    assert _check(world)["Patient"] == len([i for i in range(len(patients)) if not i % 2])

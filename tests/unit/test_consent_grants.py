"""Materialised consent grants: a table of cases, then agreement with decide() over random consents."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
from collections import Counter
from collections.abc import Iterator
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from security.consent import GRANTABLE_LABELS, AccessRequest, ConsentPolicy, Provision, decide
from security.consent_grants import MAX_LABEL_UNIVERSE, Grant, grant_sort_key, materialise_grants

UTC = dt.UTC
T0 = dt.datetime(2025, 1, 1, tzinfo=UTC)
DAY = dt.timedelta(days=1)
TICK = dt.timedelta(microseconds=1)

ORG = "org-a"
OTHER_ORG = "org-b"
PATIENT = "p1"
TYPES = ["Observation", "Condition", "Encounter"]
LABELS = ["HIV", "PSY", "R"]  # R (restricted) is not sensitive, but a deny can name it


def fs(*items: str) -> frozenset[str]:
    return frozenset(items)


def permit(**changes: Any) -> Provision:
    base = Provision(type="permit", actors=fs(ORG), purposes=fs("PUBHLTH"), classes=fs("Observation"))
    return dataclasses.replace(base, **changes)


def deny(**changes: Any) -> Provision:
    return dataclasses.replace(Provision(type="deny"), **changes)


def consent(provision: Provision | None = None, **changes: Any) -> ConsentPolicy:
    base = ConsentPolicy(
        consent_id="c1",
        version=1,
        patient_id=PATIENT,
        status="active",
        policy_kind="voluntary",
        provision=provision or permit(),
    )
    return dataclasses.replace(base, **changes)


def grants(*cs: ConsentPolicy, labels: list[str] | None = None) -> list[Grant]:
    return materialise_grants(PATIENT, cs, resource_types=TYPES, label_universe=labels or [])


Row = tuple[str, str, str, frozenset[str], dt.datetime | None, dt.datetime | None, str, str, int]


def rows(gs: list[Grant]) -> list[Row]:
    return [dataclasses.astuple(g) for g in gs]


def row(
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
    *,
    org: str = ORG,
    purpose: str = "PUBHLTH",
    rtype: str = "Observation",
    labels: frozenset[str] = fs(),
    rule: str = "permit.consent",
    cid: str = "c1",
    version: int = 1,
) -> Row:
    return (org, purpose, rtype, labels, start, end, rule, cid, version)


# --- table ---------------------------------------------------------------------


def test_simple_permit() -> None:
    assert rows(grants(consent())) == [row()]


def test_classes_empty_means_every_given_type() -> None:
    assert rows(grants(consent(permit(classes=fs())))) == [row(rtype=t) for t in sorted(TYPES)]


def test_statutory_rule_and_version() -> None:
    got = grants(consent(policy_kind="statutory", version=3))
    assert rows(got) == [row(rule="permit.statutory", version=3)]


def test_nested_deny_by_class_removes_it() -> None:
    p = permit(classes=fs("Observation", "Condition"), provisions=(deny(classes=fs("Observation")),))
    assert rows(grants(consent(p))) == [row(rtype="Condition")]


def test_withdrawn_and_draft_give_nothing() -> None:
    assert grants(consent(status="inactive")) == []
    assert grants(consent(status="draft")) == []
    assert grants(consent(), consent(version=2, status="inactive")) == []


def test_latest_version_regrants() -> None:
    assert rows(grants(consent(status="inactive"), consent(version=2))) == [row(version=2)]


def test_consent_period_bounds() -> None:
    start, end = T0, T0 + 30 * DAY
    assert rows(grants(consent(period_start=start, period_end=end))) == [row(start, end)]
    assert rows(grants(consent(period_start=start))) == [row(start, None)]
    assert rows(grants(consent(period_end=end))) == [row(None, end)]


def test_provision_period_inside_consent_period() -> None:
    c = consent(permit(period_start=T0 + 10 * DAY), period_start=T0, period_end=T0 + 30 * DAY)
    assert rows(grants(c)) == [row(T0 + 10 * DAY, T0 + 30 * DAY)]


def test_nested_deny_period_splits_the_interval() -> None:
    hole = deny(period_start=T0 + 10 * DAY, period_end=T0 + 20 * DAY)
    c = consent(permit(provisions=(hole,)), period_start=T0, period_end=T0 + 30 * DAY)
    assert rows(grants(c)) == [row(T0, T0 + 10 * DAY), row(T0 + 20 * DAY, T0 + 30 * DAY)]


def test_adjacent_intervals_with_the_same_decision_merge() -> None:
    # Boundaries that do not change the answer leave a single grant.
    c = consent(
        permit(provisions=(deny(purposes=fs("TREAT"), period_start=T0 + 5 * DAY),)),
        period_start=T0,
        period_end=T0 + 30 * DAY,
    )
    assert rows(grants(c)) == [row(T0, T0 + 30 * DAY)]


def test_different_consents_over_time_do_not_merge() -> None:
    a = consent(consent_id="a", period_end=T0 + 10 * DAY)
    b = consent(consent_id="b", period_start=T0 + 10 * DAY)
    assert rows(grants(a, b)) == [row(None, T0 + 10 * DAY, cid="a"), row(T0 + 10 * DAY, None, cid="b")]


def test_sensitive_label_named() -> None:
    got = rows(grants(consent(permit(security_labels=fs("HIV"))), labels=LABELS))
    # Every label set within {HIV, R} except R alone: R beside HIV is HIV's confidentiality.
    assert got == [row(labels=s) for s in [fs(), fs("HIV"), fs("HIV", "R")]]


def test_sensitive_label_not_named() -> None:
    got = rows(grants(consent(), labels=LABELS))
    assert got == [row(labels=fs())]


def test_restricted_named() -> None:
    got = rows(grants(consent(permit(security_labels=fs("R"))), labels=LABELS))
    assert got == [row(labels=fs()), row(labels=fs("R"))]


def test_deny_by_non_sensitive_label() -> None:
    c = consent(permit(provisions=(deny(security_labels=fs("R")),)))
    assert rows(grants(c, labels=LABELS)) == [row(labels=fs())]


def test_two_consents() -> None:
    a = consent(consent_id="a")
    b = consent(permit(actors=fs(OTHER_ORG), purposes=fs("TREAT")), consent_id="b")
    assert rows(grants(a, b)) == [row(cid="a"), row(org=OTHER_ORG, purpose="TREAT", cid="b")]


def test_a_refusal_in_another_consent_removes_the_grant() -> None:
    refusal = consent(deny(actors=fs(ORG), period_start=T0), consent_id="c2")
    assert rows(grants(consent(), refusal)) == [row(None, T0)]


def test_actor_inherited_from_an_enclosing_deny() -> None:
    # The permit names no actor; it inherits org-a from the deny around it.
    c = consent(deny(actors=fs(ORG), provisions=(permit(actors=fs()),)))
    assert rows(grants(c)) == [row()]


def test_other_patient_and_malformed() -> None:
    assert grants(consent(patient_id="p2")) == []
    naive = consent(consent_id="c2", period_end=dt.datetime(2025, 6, 1))
    assert grants(consent(), naive) == []  # an active malformed consent blocks everything
    assert rows(grants(consent(), dataclasses.replace(naive, status="inactive"))) == [row()]


def test_bounds_are_utc_and_deduplicated() -> None:
    plus5 = dt.timezone(dt.timedelta(hours=5))
    c = consent(permit(period_end=(T0 + DAY).astimezone(plus5)), period_start=T0.astimezone(plus5))
    [g] = grants(c)
    assert (g.valid_from, g.valid_to) == (T0, T0 + DAY)
    assert g.valid_from is not None and g.valid_from.tzinfo is UTC


NEW_YORK = ZoneInfo("America/New_York")
# 2025-03-09 03:00 EDT = 07:00Z. One microsecond earlier *on the wall clock* is
# 02:59:59.999999, which does not exist and reads as EST: 07:59:59.999999Z, after it.
SPRING_FORWARD = dt.datetime(2025, 3, 9, 3, 0, tzinfo=NEW_YORK)


def test_instant_before_first_bound_is_not_wall_clock() -> None:
    seven = dt.datetime(2025, 3, 9, 7, 0, tzinfo=UTC)
    assert rows(grants(consent(period_start=SPRING_FORWARD))) == [row(seven, None)]
    assert rows(grants(consent(period_end=SPRING_FORWARD))) == [row(None, seven)]


def test_extreme_bounds() -> None:
    earliest = dt.datetime.min.replace(tzinfo=UTC)
    latest = dt.datetime.max.replace(tzinfo=UTC)
    assert rows(grants(consent(period_start=earliest, period_end=latest))) == [row(earliest, latest)]
    # Wall clock datetime.min at +05:00 is before datetime.min UTC: not representable in UTC.
    plus5 = dt.timezone(dt.timedelta(hours=5))
    early = dt.datetime.min.replace(tzinfo=plus5)
    [g] = grants(consent(period_start=early))
    assert g.valid_from == early and g.valid_to is None
    before = dt.datetime.min.replace(tzinfo=dt.timezone(dt.timedelta(hours=5, microseconds=1)))
    assert not decide(req(at=before), [consent(period_start=early)]).permit


def test_label_universe_is_capped() -> None:
    nine = [f"L{i}" for i in range(MAX_LABEL_UNIVERSE + 1)]
    with pytest.raises(ValueError, match="at most"):
        grants(consent(), labels=nine)
    assert len(GRANTABLE_LABELS) <= MAX_LABEL_UNIVERSE
    every = sorted(GRANTABLE_LABELS)
    named = grants(consent(permit(security_labels=fs(*every))), labels=every)
    # Every label set is permitted, R alone included, since R is named too.
    assert len(named) == 2 ** len(every) * len(grants(consent()))


def test_bad_names_are_refused() -> None:
    with pytest.raises(ValueError):
        materialise_grants(PATIENT, [consent()], resource_types=[""], label_universe=[])
    with pytest.raises(ValueError):
        materialise_grants(PATIENT, [consent()], resource_types=TYPES, label_universe=[1])  # type: ignore[list-item]


def test_label_outside_universe_fails_closed() -> None:
    # A label no consent can grant: decide() denies it even when named, and no grant matches it.
    c = consent(permit(security_labels=fs("SEX", "HIV")))
    assert not decide(req(security_labels=fs("SEX")), [c]).permit
    assert not decide(req(security_labels=fs("urn:x|y")), [consent()]).permit
    assert not any("SEX" in g.labels for g in grants(c, labels=["HIV", "SEX"]))
    assert rows(grants(c, labels=["HIV", "SEX"])) == [row(labels=fs()), row(labels=fs("HIV"))]


# --- agreement with decide() ---------------------------------------------------------

POOL_ORGS = ["org-a", "org-b"]
POOL_PURPOSES = ["PUBHLTH", "TREAT"]
PLUS_0530 = dt.timezone(dt.timedelta(hours=5, minutes=30))
MINUS_3 = dt.timezone(dt.timedelta(hours=-3))
# Instants 30 days apart, some written with other offsets, plus two that differ
# from a neighbour by a microsecond and one on a DST change in a zone.
TIMES: list[dt.datetime] = [
    T0,
    (T0 + 30 * DAY).astimezone(PLUS_0530),
    T0 + 60 * DAY,
    (T0 + 60 * DAY + TICK).astimezone(MINUS_3),
    T0 + 90 * DAY,
    T0 + 120 * DAY,
    SPRING_FORWARD,
]
STATUSES = ["active"] * 6 + ["inactive", "draft"]


def subsets(pool: list[str]) -> st.SearchStrategy[frozenset[str]]:
    return st.frozensets(st.sampled_from(pool), max_size=len(pool))


@st.composite
def periods(draw: st.DrawFn) -> tuple[dt.datetime | None, dt.datetime | None]:
    start = draw(st.sampled_from([None, None, *TIMES]))
    end = draw(st.sampled_from([None, None, *TIMES]))
    if start is not None and end is not None and start > end:
        start, end = end, start
    return start, end


@st.composite
def provisions(draw: st.DrawFn, depth: int = 2) -> Provision:
    start, end = draw(periods())
    children: tuple[Provision, ...] = ()
    if depth > 0:
        children = tuple(draw(st.lists(provisions(depth - 1), max_size=2)))
    return Provision(
        type=draw(st.sampled_from(["permit", "permit", "permit", "deny"])),
        actors=draw(st.sampled_from([fs(ORG), fs(*POOL_ORGS)]) | subsets(POOL_ORGS)),
        purposes=draw(st.sampled_from([fs("PUBHLTH"), fs(*POOL_PURPOSES)]) | subsets(POOL_PURPOSES)),
        classes=draw(subsets(TYPES[:2])),
        security_labels=draw(subsets(LABELS)),
        period_start=start,
        period_end=end,
        provisions=children,
    )


@st.composite
def consents(draw: st.DrawFn) -> ConsentPolicy:
    start, end = draw(periods())
    if draw(st.integers(0, 30)) == 0:  # now and then a malformed (naive) bound
        end = dt.datetime(2025, 3, 1)
    return ConsentPolicy(
        consent_id=draw(st.sampled_from(["c1", "c2", "c3"])),
        version=draw(st.integers(1, 2)),
        patient_id=draw(st.sampled_from([PATIENT, PATIENT, PATIENT, "p2"])),
        status=draw(st.sampled_from(STATUSES)),
        policy_kind=draw(st.sampled_from(["voluntary", "statutory"])),
        provision=draw(provisions()),
        period_start=start,
        period_end=end,
    )


def with_hole(cs: list[ConsentPolicy]) -> list[ConsentPolicy]:
    """Add a consent with a time hole in it, so that split grants are common."""
    hole = deny(period_start=TIMES[1], period_end=TIMES[3])
    holed = consent(permit(classes=fs(), provisions=(hole,)), consent_id="c9", policy_kind="statutory")
    return [*cs, holed]


plain_lists = st.lists(consents(), min_size=1, max_size=3, unique_by=lambda c: (c.consent_id, c.version))
consent_lists = plain_lists | plain_lists.map(with_hole)


def walk(p: Provision) -> Iterator[Provision]:
    yield p
    for child in p.provisions:
        yield from walk(child)


def instants(cs: list[ConsentPolicy]) -> st.SearchStrategy[dt.datetime]:
    """Times at, just around and between the bounds, in UTC and other fixed offsets."""
    bounds = {
        b
        for c in cs
        for b in (
            c.period_start,
            c.period_end,
            *(x for p in walk(c.provision) for x in (p.period_start, p.period_end)),
        )
        if b is not None and b.utcoffset() is not None
    } or {T0}
    near = st.sampled_from(sorted(bounds)).flatmap(
        lambda b: st.sampled_from([b, b - TICK, b + TICK, b - 15 * DAY, b + 15 * DAY])
    )
    anywhere = st.datetimes(
        min_value=dt.datetime(2024, 6, 1), max_value=dt.datetime(2025, 9, 1), timezones=st.just(UTC)
    )
    zone = st.sampled_from([UTC, PLUS_0530, MINUS_3])
    return st.tuples(near | anywhere, zone).map(lambda bz: bz[0].astimezone(bz[1]))


def req(**changes: Any) -> AccessRequest:
    base = AccessRequest(
        client_id="some-client",
        organization_id=ORG,
        role="authority",
        purpose="PUBHLTH",
        patient_id=PATIENT,
        resource_type="Observation",
        security_labels=frozenset(),
        at=T0,
    )
    return dataclasses.replace(base, **changes)


random_queries = st.fixed_dictionaries(
    {
        "organization_id": st.sampled_from([ORG, ORG, OTHER_ORG, "org-z"]),
        "purpose": st.sampled_from(["PUBHLTH", "PUBHLTH", "TREAT", "HRESCH"]),
        "resource_type": st.sampled_from(TYPES),
        "security_labels": st.just(fs()) | subsets(LABELS),
    }
)


def random_asks(cs: list[ConsentPolicy]) -> st.SearchStrategy[AccessRequest]:
    return st.builds(lambda q, at: req(at=at, **q), random_queries, instants(cs))


def granted_asks(gs: list[Grant], cs: list[ConsentPolicy]) -> st.SearchStrategy[AccessRequest]:
    """Questions about some grant's kind of resource, at (or a microsecond outside) its bounds or
    any time: so that permits are common and the edges of every interval get tested."""

    def about(g: Grant) -> st.SearchStrategy[AccessRequest]:
        inside = [g.valid_from, None if g.valid_to is None else g.valid_to - TICK]
        if g.valid_from is not None and g.valid_to is not None:
            inside.append(g.valid_from + (g.valid_to - g.valid_from) / 2)
        elif g.valid_from is not None:
            inside.append(g.valid_from + 30 * DAY)
        elif g.valid_to is not None:
            inside.append(g.valid_to - 30 * DAY)
        outside = [None if g.valid_from is None else g.valid_from - TICK, g.valid_to]
        edges = [at for at in inside + inside + outside if at is not None]
        ask = req(
            organization_id=g.organization_id,
            purpose=g.purpose,
            resource_type=g.resource_type,
            security_labels=g.labels,
        )
        times = st.sampled_from(edges) | instants(cs) if edges else instants(cs)
        return times.map(lambda at: dataclasses.replace(ask, at=at))

    return st.sampled_from(gs).flatmap(about)


def check_agreement(cs: list[ConsentPolicy], gs: list[Grant], asks: list[AccessRequest]) -> Counter[str]:
    """decide() permits iff exactly one grant matches, and then with the same rule and consent."""
    seen: Counter[str] = Counter()
    assert gs == sorted(gs, key=grant_sort_key)
    assert gs == materialise_grants(PATIENT, list(reversed(cs)), resource_types=TYPES, label_universe=LABELS)
    check_structure(gs)
    keys = [(g.organization_id, g.purpose, g.resource_type, g.labels) for g in gs]
    seen["split"] += len(keys) - len(set(keys))
    seen["bounded"] += sum(g.valid_from is not None and g.valid_to is not None for g in gs)
    for ask in asks:
        decision = decide(ask, cs)
        matching = [
            g
            for g in gs
            if (g.organization_id, g.purpose, g.resource_type, g.labels)
            == (ask.organization_id, ask.purpose, ask.resource_type, ask.security_labels)
            and g.covers(ask.at)
        ]
        assert len(matching) <= 1
        assert decision.permit == bool(matching), (decision, ask)
        if matching:
            [g] = matching
            assert (g.rule, g.consent_id, g.consent_version) == (
                decision.rule,
                decision.consent_id,
                decision.consent_version,
            )
        seen["permit" if decision.permit else "deny"] += 1
    return seen


def check_structure(gs: list[Grant]) -> None:
    """Per kind of resource, intervals are non-empty, disjoint, and merged when they touch."""
    by_key: dict[tuple[str, str, str, frozenset[str]], list[Grant]] = {}
    for g in gs:
        by_key.setdefault((g.organization_id, g.purpose, g.resource_type, g.labels), []).append(g)
        assert g.rule in ("permit.consent", "permit.statutory")
        for bound in (g.valid_from, g.valid_to):
            assert bound is None or bound.tzinfo is UTC
        if g.valid_from is not None and g.valid_to is not None:
            assert g.valid_from < g.valid_to
    for run in by_key.values():
        for a, b in itertools.pairwise(run):
            assert a.valid_to is not None and b.valid_from is not None
            assert a.valid_to <= b.valid_from
            if a.valid_to == b.valid_from:
                assert (a.rule, a.consent_id, a.consent_version) != (b.rule, b.consent_id, b.consent_version)


def test_grants_agree_with_decide() -> None:
    totals: Counter[str] = Counter()

    @settings(max_examples=250, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(cs=consent_lists, data=st.data())
    def run(cs: list[ConsentPolicy], data: st.DataObject) -> None:
        gs = materialise_grants(PATIENT, cs, resource_types=TYPES, label_universe=LABELS)
        asks = data.draw(st.lists(random_asks(cs), min_size=1, max_size=6))
        if gs:
            asks += data.draw(st.lists(granted_asks(gs, cs), min_size=4, max_size=12))
        totals.update(check_agreement(cs, gs, asks))

    run()
    # Not vacuous: a fair share of the questions are permitted, and some grants
    # are bounded in time or split (periods and nested denies at work).
    assert totals["permit"] >= 0.1 * (totals["permit"] + totals["deny"]), totals
    assert totals["bounded"] > 0 and totals["split"] > 0, totals

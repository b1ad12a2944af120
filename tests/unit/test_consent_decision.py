"""The consent decision point: a table of cases, then properties over random consents."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from security.consent import (
    GRANTABLE_LABELS,
    RULES,
    SENSITIVE_LABELS,
    AccessRequest,
    ConsentPolicy,
    Decision,
    Provision,
    decide,
)

UTC = dt.UTC
T0 = dt.datetime(2025, 1, 1, tzinfo=UTC)
NOW = dt.datetime(2025, 6, 1, tzinfo=UTC)
DAY = dt.timedelta(days=1)

ORG = "org-cdc"
OTHER_ORG = "org-phac"
PATIENT = "pat-1"


def request(**changes: Any) -> AccessRequest:
    base = AccessRequest(
        client_id="client-1",
        organization_id=ORG,
        role="authority",
        purpose="PUBHLTH",
        patient_id=PATIENT,
        resource_type="Observation",
        security_labels=frozenset(),
        at=NOW,
    )
    return dataclasses.replace(base, **changes)


def permit(**changes: Any) -> Provision:
    base = Provision(
        type="permit",
        actors=frozenset({ORG}),
        purposes=frozenset({"PUBHLTH", "COC"}),
        classes=frozenset({"Observation", "Condition", "Patient"}),
    )
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
        period_start=T0,
        period_end=T0 + 365 * DAY,
    )
    return dataclasses.replace(base, **changes)


def fs(*items: str) -> frozenset[str]:
    return frozenset(items)


# One case per entry: (id, consents, request changes, expected rule, consent id
# that decided). A rule starting with "permit." means permitted.
# fmt: off
CASES: list[tuple[str, list[Any], dict[str, Any], str, str | None]] = [
    ("permitted", [consent()], {}, "permit.consent", "c1"),
    ("classes empty = all types",
     [consent(permit(classes=fs()))], {"resource_type": "Encounter"}, "permit.consent", "c1"),
    ("no consent", [], {}, "deny.default.no-consent", None),
    ("consent for another organization",
     [consent(permit(actors=fs(OTHER_ORG)))], {}, "deny.actor", None),
    ("permit with no actors permits nobody", [consent(permit(actors=fs()))], {}, "deny.actor", None),
    ("withdrawn", [consent(status="inactive")], {}, "deny.consent.withdrawn", "c1"),
    ("withdrawn, other org's",
     [consent(permit(actors=fs(OTHER_ORG)), status="inactive")], {}, "deny.actor", None),
    ("draft is not in force", [consent(status="draft")], {}, "deny.consent.not-active", "c1"),
    ("unknown status", [consent(status="paused")], {}, "deny.consent.not-active", "c1"),
    ("expired", [consent(period_end=NOW - DAY)], {}, "deny.consent.expired", "c1"),
    ("end is exclusive", [consent(period_end=NOW)], {}, "deny.consent.expired", "c1"),
    ("start is inclusive", [consent(period_start=NOW)], {}, "permit.consent", "c1"),
    ("not yet started",
     [consent(period_start=NOW + DAY)], {}, "deny.consent.not-yet-valid", "c1"),
    ("open period", [consent(period_start=None, period_end=None)], {}, "permit.consent", "c1"),
    ("provision period expired",
     [consent(permit(period_end=NOW - DAY))], {}, "deny.consent.expired", "c1"),
    ("wrong purpose", [consent()], {"purpose": "TREAT"}, "deny.purpose", "c1"),
    ("permit with no purposes permits nothing",
     [consent(permit(purposes=fs()))], {}, "deny.purpose", "c1"),
    ("resource type not in class",
     [consent()], {"resource_type": "MedicationAdministration"}, "deny.class", "c1"),
    ("sensitive label not named",
     [consent()], {"security_labels": fs("HIV")}, "deny.sensitive-label", "c1"),
    ("sensitive label named",
     [consent(permit(security_labels=fs("HIV")))], {"security_labels": fs("HIV")},
     "permit.consent", "c1"),
    ("every sensitive label must be named",
     [consent(permit(security_labels=fs("HIV")))], {"security_labels": fs("HIV", "PSY")},
     "deny.sensitive-label", "c1"),
    # Unknown labels fail closed (issue 11 item 2): the labeller passes only restricting labels.
    ("R with a named sensitivity label needs no naming of its own",
     [consent(permit(security_labels=fs("HIV")))], {"security_labels": fs("HIV", "R")},
     "permit.consent", "c1"),
    ("R alone must be named",
     [consent()], {"security_labels": fs("R")}, "deny.sensitive-label", "c1"),
    ("R alone, named",
     [consent(permit(security_labels=fs("R")))], {"security_labels": fs("R")}, "permit.consent", "c1"),
    ("V is never disclosed, even when named",
     [consent(permit(security_labels=fs("V", "HIV")))], {"security_labels": fs("HIV", "V")},
     "deny.sensitive-label", "c1"),
    ("STD, MH and SDV need to be named",
     [consent()], {"security_labels": fs("STD")}, "deny.sensitive-label", "c1"),
    ("STD, MH and SDV named",
     [consent(permit(security_labels=fs("STD", "MH", "SDV")))], {"security_labels": fs("MH", "SDV", "STD")},
     "permit.consent", "c1"),
    ("a sensitivity label the service cannot grant is withheld even when named",
     [consent(permit(security_labels=fs("SEX")))], {"security_labels": fs("SEX")},
     "deny.sensitive-label", "c1"),
    ("an unknown label is withheld",
     [consent()], {"security_labels": fs("urn:x|secret")}, "deny.sensitive-label", "c1"),
    ("an unknown label is withheld even beside a named one",
     [consent(permit(security_labels=fs("HIV")))], {"security_labels": fs("HIV", "R", "NORMAL")},
     "deny.sensitive-label", "c1"),
    ("a nested deny by R applies to a resource R beside HIV",
     [consent(permit(security_labels=fs("HIV"), provisions=(deny(security_labels=fs("R")),)))],
     {"security_labels": fs("HIV", "R")}, "deny.provision.deny", "c1"),
    ("nested permit names the label",
     [consent(permit(provisions=(permit(security_labels=fs("SUD")),)))],
     {"security_labels": fs("SUD")}, "permit.consent", "c1"),
    ("nested deny by class",
     [consent(permit(provisions=(deny(classes=fs("Observation")),)))], {},
     "deny.provision.deny", "c1"),
    ("nested deny by class, other class",
     [consent(permit(provisions=(deny(classes=fs("Condition")),)))], {}, "permit.consent", "c1"),
    ("nested deny by label",
     [consent(permit(security_labels=fs("HIV"), provisions=(deny(security_labels=fs("HIV")),)))],
     {"security_labels": fs("HIV")}, "deny.provision.deny", "c1"),
    ("nested deny by label, unlabelled resource",
     [consent(permit(provisions=(deny(security_labels=fs("HIV")),)))], {}, "permit.consent", "c1"),
    ("nested deny by period, inside",
     [consent(permit(provisions=(deny(period_start=NOW - DAY, period_end=NOW + DAY),)))], {},
     "deny.provision.deny", "c1"),
    ("nested deny by period, after it",
     [consent(permit(provisions=(deny(period_start=T0, period_end=NOW - DAY),)))], {},
     "permit.consent", "c1"),
    ("nested deny by purpose",
     [consent(permit(provisions=(deny(purposes=fs("PUBHLTH")),)))], {},
     "deny.provision.deny", "c1"),
    ("nested deny for another actor",
     [consent(permit(actors=fs(ORG, OTHER_ORG), provisions=(deny(actors=fs(OTHER_ORG)),)))], {},
     "permit.consent", "c1"),
    ("nested deny under a permit for someone else",
     [consent(permit(actors=fs(OTHER_ORG), provisions=(deny(),))), consent(consent_id="c2")], {},
     "permit.consent", "c2"),
    ("deny all except one recipient", [consent(deny(provisions=(permit(),)))], {},
     "permit.consent", "c1"),
    ("deny all except one recipient, not us",
     [consent(deny(provisions=(permit(actors=fs(OTHER_ORG)),)))], {}, "deny.provision.deny", "c1"),
    ("two consents, one denies",
     [consent(), consent(deny(actors=fs(ORG)), consent_id="c2")], {}, "deny.provision.deny", "c2"),
    ("two consents, the deny is for another org",
     [consent(), consent(deny(actors=fs(OTHER_ORG)), consent_id="c2")], {}, "permit.consent", "c1"),
    ("a withdrawn deny no longer denies",
     [consent(), consent(deny(), consent_id="c2", status="inactive")], {}, "permit.consent", "c1"),
    ("statutory policy", [consent(policy_kind="statutory")], {}, "permit.statutory", "c1"),
    ("statutory reported over voluntary",
     [consent(consent_id="a"), consent(consent_id="z", policy_kind="statutory")], {},
     "permit.statutory", "z"),
    ("a refusal beats a statutory permit",
     [consent(policy_kind="statutory"), consent(deny(), consent_id="c2")], {},
     "deny.provision.deny", "c2"),
    ("clinic role", [consent()], {"role": "clinic"}, "deny.role", None),
    ("auditor role", [consent()], {"role": "auditor"}, "deny.role", None),
    ("consent for another patient",
     [consent(patient_id="pat-2")], {}, "deny.default.no-consent", None),
    ("latest version withdraws",
     [consent(), consent(version=2, status="inactive")], {}, "deny.consent.withdrawn", "c1"),
    ("latest version re-grants",
     [consent(status="inactive"), consent(version=2)], {}, "permit.consent", "c1"),
    ("furthest reason wins",
     [consent(status="inactive"), consent(consent_id="c2")], {"purpose": "TREAT"},
     "deny.purpose", "c2"),
    ("furthest reason wins, label",
     [consent(consent_id="c2", period_end=NOW - DAY), consent()], {"security_labels": fs("PSY")},
     "deny.sensitive-label", "c1"),
    ("naive time", [consent()], {"at": NOW.replace(tzinfo=None)}, "deny.request.invalid", None),
    ("empty patient id",
     [consent(patient_id="")], {"patient_id": ""}, "deny.request.invalid", None),
    ("malformed active consent blocks",
     [consent(), consent(consent_id="c2", period_end=NOW.replace(tzinfo=None))], {},
     "deny.consent.invalid", "c2"),
    ("malformed withdrawn consent is ignored",
     [consent(), consent(consent_id="c2", status="inactive", policy_kind="?")], {},
     "permit.consent", "c1"),
    ("reversed period is malformed",
     [consent(permit(period_start=NOW + DAY, period_end=NOW))], {}, "deny.consent.invalid", "c1"),
    ("two different records of one version",
     [consent(), consent(status="inactive")], {}, "deny.consent.invalid", None),
    ("not a consent at all", [consent(), {"consent_id": "c1"}], {}, "deny.consent.invalid", None),
]
# fmt: on


@pytest.mark.parametrize(
    ("consents", "changes", "rule", "decided_by"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_decision_table(
    consents: list[ConsentPolicy], changes: dict[str, Any], rule: str, decided_by: str | None
) -> None:
    decision = decide(request(**changes), consents)
    assert (decision.rule, decision.consent_id) == (rule, decided_by)
    assert decision.permit is rule.startswith("permit.")
    assert decision.rule in RULES
    if decided_by is not None:
        assert decision.consent_version is not None


def test_sensitive_labels_cover_the_design() -> None:
    # The design names HIV, mental health and substance use.
    assert {"HIV", "PSY", "MH", "BH", "SUD", "ETH"} <= SENSITIVE_LABELS
    # Issue 11 item 2 names STD, MH and SDV as labels clinics use: a consent can grant them.
    assert {"HIV", "PSY", "MH", "SUD", "STD", "SDV", "R"} == GRANTABLE_LABELS
    assert "V" not in GRANTABLE_LABELS
    assert GRANTABLE_LABELS - {"R"} <= SENSITIVE_LABELS


def test_never_raises_on_odd_input() -> None:
    weird = Provision(type="permit", actors=["org-cdc"], purposes=None)  # type: ignore[arg-type]
    odd: list[Any] = [
        consent(weird),
        consent(consent_id="c2", version="1"),
        dataclasses.replace(consent(consent_id="c3"), provision=None),  # type: ignore[arg-type]
        consent(consent_id="c4", provision=permit(provisions=[deny()])),  # list, not tuple
        None,
        42,
    ]
    for item in odd:
        assert decide(request(), [item]).permit is False
    assert decide(None, [consent()]).rule == "deny.request.invalid"  # type: ignore[arg-type]
    assert decide(request(security_labels=["HIV"]), [consent()]).permit is False
    assert decide(request(at="2025-06-01"), [consent()]).permit is False


def test_provision_depth_is_bounded() -> None:
    node = permit()
    for _ in range(40):
        node = permit(provisions=(node,))
    assert decide(request(), [consent(node)]) == Decision(False, "deny.consent.invalid", "c1", 1)


# --- properties --------------------------------------------------------------

ORGS = ["org-a", "org-b"]
PURPOSES = ["PUBHLTH", "TREAT"]
TYPES = ["Observation", "Condition"]
LABELS = ["HIV", "R"]
TIMES = [T0 + k * 30 * DAY for k in range(5)]
STATUSES = ["active"] * 6 + ["inactive", "draft", "entered-in-error"]


def subsets(pool: list[str]) -> st.SearchStrategy[frozenset[str]]:
    return st.frozensets(st.sampled_from(pool), max_size=len(pool))


@st.composite
def periods(draw: st.DrawFn) -> tuple[dt.datetime | None, dt.datetime | None]:
    # Mostly open periods, so that enough random consents are in force.
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
        actors=draw(st.sampled_from([frozenset(ORGS[:1]), frozenset(ORGS)]) | subsets(ORGS)),
        purposes=draw(st.sampled_from([frozenset(PURPOSES[:1]), frozenset(PURPOSES)]) | subsets(PURPOSES)),
        classes=draw(subsets(TYPES)),
        security_labels=draw(subsets(LABELS)),
        period_start=start,
        period_end=end,
        provisions=children,
    )


@st.composite
def consents(draw: st.DrawFn) -> ConsentPolicy:
    start, end = draw(periods())
    return ConsentPolicy(
        consent_id=draw(st.sampled_from(["c1", "c2", "c3"])),
        version=draw(st.integers(1, 2)),
        patient_id=draw(st.sampled_from(["p1", "p1", "p1", "p2"])),
        status=draw(st.sampled_from(STATUSES)),
        policy_kind=draw(st.sampled_from(["voluntary", "statutory"])),
        provision=draw(provisions()),
        period_start=start,
        period_end=end,
    )


consent_lists = st.lists(consents(), min_size=1, max_size=3, unique_by=lambda c: (c.consent_id, c.version))
requests = st.builds(
    AccessRequest,
    client_id=st.just("client"),
    organization_id=st.sampled_from(ORGS),
    role=st.sampled_from(["authority"] * 9 + ["clinic"]),
    purpose=st.sampled_from(PURPOSES),
    patient_id=st.sampled_from(["p1", "p1", "p1", "p2"]),
    resource_type=st.sampled_from(TYPES),
    security_labels=subsets(LABELS),
    at=st.sampled_from(TIMES) | st.sampled_from(TIMES).map(lambda t: t + 15 * DAY),
)
PROPERTY = settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)


def walk(p: Provision) -> Iterator[Provision]:
    yield p
    for child in p.provisions:
        yield from walk(child)


def in_period(at: dt.datetime, start: dt.datetime | None, end: dt.datetime | None) -> bool:
    return (start is None or start <= at) and (end is None or at < end)


def test_strategies_reach_permits() -> None:
    # Otherwise the properties below would hold vacuously.
    find(
        st.tuples(requests, consent_lists),
        lambda rc: decide(rc[0], rc[1]).permit,
        settings=settings(max_examples=2000, database=None),
    )


@PROPERTY
@given(req=requests, cs=consent_lists)
def test_no_permit_without_a_consent_naming_org_and_purpose(
    req: AccessRequest, cs: list[ConsentPolicy]
) -> None:
    decision = decide(req, cs)
    assert decision.rule in RULES and decision.rule != "deny.error"
    if not decision.permit:
        return
    assert req.role == "authority"
    [chosen] = [c for c in cs if (c.consent_id, c.version) == (decision.consent_id, decision.consent_version)]
    assert chosen.version == max(c.version for c in cs if c.consent_id == chosen.consent_id)
    assert chosen.patient_id == req.patient_id
    assert chosen.status == "active"
    assert in_period(req.at, chosen.period_start, chosen.period_end)
    nodes = list(walk(chosen.provision))
    assert any(req.organization_id in p.actors for p in nodes)
    assert any(req.purpose in p.purposes for p in nodes)
    sensitive = req.security_labels & SENSITIVE_LABELS
    assert sensitive <= frozenset().union(*(p.security_labels for p in nodes))
    # Every label of the resource is grantable and named (R beside a sensitivity label excepted).
    to_name = req.security_labels - ({"R"} if sensitive else set())
    assert to_name <= GRANTABLE_LABELS
    assert to_name <= frozenset().union(*(p.security_labels for p in nodes))
    assert decision.rule == ("permit.statutory" if chosen.policy_kind == "statutory" else "permit.consent")


def add_child(p: Provision, path: list[int], new: Provision) -> Provision:
    if not path or not p.provisions:
        return dataclasses.replace(p, provisions=(*p.provisions, new))
    i = path[0] % len(p.provisions)
    kids = list(p.provisions)
    kids[i] = add_child(kids[i], path[1:], new)
    return dataclasses.replace(p, provisions=tuple(kids))


@PROPERTY
@given(req=requests, cs=consent_lists, data=st.data())
def test_adding_a_deny_never_permits(
    req: AccessRequest, cs: list[ConsentPolicy], data: st.DataObject
) -> None:
    before = decide(req, cs)
    leaf = dataclasses.replace(data.draw(provisions(depth=0)), type="deny")
    into_existing = data.draw(st.booleans())
    if cs and into_existing:
        i = data.draw(st.integers(0, len(cs) - 1))
        path = data.draw(st.lists(st.integers(0, 3), max_size=3))
        changed = dataclasses.replace(cs[i], provision=add_child(cs[i].provision, path, leaf))
        after_cs = [*cs[:i], changed, *cs[i + 1 :]]
    else:
        new = data.draw(consents())
        after_cs = [*cs, dataclasses.replace(new, consent_id="c-new", provision=leaf)]
    after = decide(req, after_cs)
    if not before.permit:
        assert not after.permit


@PROPERTY
@given(req=requests, cs=consent_lists, shift=st.integers(0, 100))
def test_withdrawing_or_expiring_everything_denies(
    req: AccessRequest, cs: list[ConsentPolicy], shift: int
) -> None:
    withdrawn = [dataclasses.replace(c, status="inactive") for c in cs]
    assert not decide(req, withdrawn).permit

    end = TIMES[2]

    def expire(c: ConsentPolicy) -> ConsentPolicy:
        start = c.period_start if c.period_start is None or c.period_start <= end else end
        return dataclasses.replace(c, period_start=start, period_end=end)

    later = dataclasses.replace(req, at=end + dt.timedelta(hours=shift))
    assert not decide(later, [expire(c) for c in cs]).permit


@PROPERTY
@given(req=requests, cs=consent_lists, data=st.data())
def test_deterministic_and_order_independent(
    req: AccessRequest, cs: list[ConsentPolicy], data: st.DataObject
) -> None:
    first = decide(req, cs)
    assert decide(req, cs) == first
    assert decide(req, tuple(cs)) == first
    assert decide(req, list(reversed(cs))) == first
    assert decide(req, data.draw(st.permutations(cs))) == first

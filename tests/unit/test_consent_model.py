"""FHIR Consent dicts -> ConsentPolicy, each checked through the decision point."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
from typing import Any

import pytest
from fhir.resources.R4B.consent import Consent
from hypothesis import given, settings
from hypothesis import strategies as st

from security.consent import AccessRequest, ConsentPolicy, Decision, decide
from service.records.consent_model import ORG_IDENTIFIER_SYSTEM, consent_policy_from_fhir

UTC = dt.UTC
NOW = dt.datetime(2025, 6, 1, 12, tzinfo=UTC)
STATUTORY_URI = "https://mhr.example.org/fhir/policy/us-public-health-notification"

ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"


def recipient(reference: dict[str, Any], role: str = "IRCP") -> dict[str, Any]:
    return {"role": {"coding": [{"system": PARTICIPATION, "code": role}]}, "reference": reference}


def full_consent() -> dict[str, Any]:
    """A migrant's consent to disclose to the receiving authority, with exceptions."""
    return {
        "resourceType": "Consent",
        "id": "consent-1",
        "meta": {"versionId": "3"},
        "status": "active",
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": "Patient/pat-1"},
        "dateTime": "2025-01-10T09:30:00+03:00",
        "organization": [{"reference": "Organization/clinic-nairobi"}],
        "sourceReference": {"reference": "DocumentReference/signed-form-1"},
        "policyRule": {"coding": [{"system": ACT_CODE, "code": "OPTIN"}]},
        "provision": {
            "type": "permit",
            "period": {"start": "2025-01-10", "end": "2025-12-31"},
            "actor": [
                recipient({"reference": "Organization/org-cdc"}),
                recipient({"identifier": {"system": ORG_IDENTIFIER_SYSTEM, "value": "IOM-MHD"}}),
                # The clinic keeps the record; that does not make it a recipient.
                recipient({"reference": "Organization/clinic-nairobi"}, role="CST"),
            ],
            "purpose": [
                {"system": ACT_REASON, "code": "PUBHLTH"},
                {"system": ACT_REASON, "code": "COC"},
            ],
            "class": [
                {"system": RESOURCE_TYPES, "code": "Observation"},
                {"system": RESOURCE_TYPES, "code": "Condition"},
                {"system": RESOURCE_TYPES, "code": "DiagnosticReport"},
            ],
            "securityLabel": [{"system": ACT_CODE, "code": "HIV"}],
            "provision": [
                {
                    "type": "deny",
                    "class": [{"system": RESOURCE_TYPES, "code": "DiagnosticReport"}],
                },
                {
                    "type": "deny",
                    "actor": [recipient({"reference": "Organization/org-iom"})],
                    "period": {"start": "2025-03-01", "end": "2025-03-31"},
                },
            ],
        },
    }


def resolve_org(system: str, value: str) -> str | None:
    return {"IOM-MHD": "org-iom"}.get(value) if system == ORG_IDENTIFIER_SYSTEM else None


def parse(resource: Any, **kwargs: Any) -> ConsentPolicy:
    kwargs.setdefault("resolve_org", resolve_org)
    return consent_policy_from_fhir(resource, **kwargs)


def ask(policy: ConsentPolicy, **changes: Any) -> Decision:
    base = AccessRequest(
        client_id="client-1",
        organization_id="org-cdc",
        role="authority",
        purpose="PUBHLTH",
        patient_id="pat-1",
        resource_type="Observation",
        security_labels=frozenset(),
        at=NOW,
    )
    return decide(dataclasses.replace(base, **changes), [policy])


def test_fixture_is_a_valid_fhir_consent() -> None:
    Consent.model_validate(full_consent())


def test_active_permit_with_exceptions() -> None:
    policy = parse(full_consent())
    assert (policy.consent_id, policy.version, policy.patient_id) == ("consent-1", 3, "pat-1")
    assert (policy.status, policy.policy_kind) == ("active", "voluntary")
    assert policy.provision.actors == {"org-cdc", "org-iom"}
    assert policy.period_start == dt.datetime(2025, 1, 10, tzinfo=UTC)
    # A date end covers the whole day: the half-open end is the next midnight.
    assert policy.period_end == dt.datetime(2026, 1, 1, tzinfo=UTC)

    assert ask(policy) == Decision(True, "permit.consent", "consent-1", 3)
    assert ask(policy, organization_id="org-iom").permit  # named by identifier
    assert ask(policy, organization_id="clinic-nairobi").rule == "deny.actor"  # custodian only
    assert ask(policy, purpose="TREAT").rule == "deny.purpose"
    assert ask(policy, resource_type="Immunization").rule == "deny.class"
    assert ask(policy, resource_type="DiagnosticReport").rule == "deny.provision.deny"
    assert ask(policy, security_labels=frozenset({"HIV"})).permit
    assert ask(policy, security_labels=frozenset({"PSY"})).rule == "deny.sensitive-label"
    march = dt.datetime(2025, 3, 15, tzinfo=UTC)
    assert ask(policy, organization_id="org-iom", at=march).rule == "deny.provision.deny"
    assert ask(policy, at=march).permit
    assert ask(policy, at=dt.datetime(2025, 12, 31, 23, 59, tzinfo=UTC)).permit
    assert ask(policy, at=dt.datetime(2026, 1, 1, tzinfo=UTC)).rule == "deny.consent.expired"
    assert ask(policy, at=dt.datetime(2025, 1, 9, tzinfo=UTC)).rule == "deny.consent.not-yet-valid"


def test_store_ids_override_the_body() -> None:
    policy = parse(full_consent(), consent_id="row-9", version=7)
    assert (policy.consent_id, policy.version) == ("row-9", 7)


def test_inactive_is_withdrawn() -> None:
    doc = full_consent() | {"status": "inactive"}
    Consent.model_validate(doc)
    assert ask(parse(doc)) == Decision(False, "deny.consent.withdrawn", "consent-1", 3)


def test_missing_provision_permits_nothing() -> None:
    doc = full_consent()
    del doc["provision"]
    Consent.model_validate(doc)
    policy = parse(doc)
    assert ask(policy).rule == "deny.actor"
    assert not any(ask(policy, organization_id=org).permit for org in ("org-cdc", "org-iom"))


def test_statutory_policy_uri() -> None:
    doc = full_consent() | {"policy": [{"uri": STATUTORY_URI}]}
    Consent.model_validate(doc)
    assert ask(parse(doc)).rule == "permit.consent"  # not configured: voluntary
    statutory = parse(doc, statutory_policies={STATUTORY_URI})
    assert statutory.policy_kind == "statutory"
    assert ask(statutory) == Decision(True, "permit.statutory", "consent-1", 3)
    by_rule = parse(full_consent(), statutory_policies={f"{ACT_CODE}|OPTIN"})
    assert by_rule.policy_kind == "statutory"


def test_unknown_status_is_void() -> None:
    assert parse(full_consent() | {"status": "paused"}).status == "entered-in-error"


def test_not_a_privacy_consent_permits_nothing() -> None:
    doc = full_consent()
    doc["scope"] = {
        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]
    }
    assert not ask(parse(doc)).permit


def test_unreadable_parts_narrow_a_permit() -> None:
    doc = full_consent()
    doc["provision"]["purpose"] = [{"system": "urn:example:other", "code": "PUBHLTH"}]
    assert ask(parse(doc)).rule == "deny.purpose"

    doc = full_consent()
    doc["provision"]["period"] = {"start": "2025-02-30"}
    assert ask(parse(doc)).rule == "deny.actor"  # the permit is gone

    doc = full_consent()
    doc["provision"]["dataPeriod"] = {"start": "2024-01-01"}  # not something we can check
    assert not ask(parse(doc)).permit

    doc = full_consent()
    doc["provision"]["action"] = [
        {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "collect"}]}
    ]
    assert not ask(parse(doc)).permit

    doc = full_consent()
    doc["provision"]["provision"].append("not a provision")  # might have been a deny
    assert not ask(parse(doc)).permit

    assert not ask(parse(full_consent(), resolve_org=None), organization_id="org-iom").permit


def test_unreadable_parts_widen_a_deny() -> None:
    doc = full_consent()
    doc["provision"]["provision"] = [
        {
            "type": "deny",
            "actor": [recipient({"identifier": {"system": "urn:example:x", "value": "?"}})],
            "purpose": [{"system": "urn:example:other", "code": "X"}],
        }
    ]
    assert ask(parse(doc)).rule == "deny.provision.deny"
    doc["provision"]["provision"][0]["type"] = "maybe"  # no known type: a deny
    assert ask(parse(doc)).rule == "deny.provision.deny"


CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"


def test_security_labels_in_the_labellers_vocabulary() -> None:
    doc = full_consent()
    doc["provision"]["securityLabel"] = [
        {"system": ACT_CODE, "code": "ETH"},  # the older code for SUD
        {"system": CONFIDENTIALITY, "code": "R"},
        {"system": ACT_CODE, "code": "V"},  # not an ActCode label: must not stand for confidentiality V
        {"system": "urn:example:labels", "code": "HIV"},  # unknown system: grants nothing
    ]
    policy = parse(doc)
    assert policy.provision.security_labels == frozenset({"SUD", "R"})
    assert ask(policy, security_labels=frozenset({"SUD", "R"})).permit
    assert ask(policy, security_labels=frozenset({"R"})).permit
    assert not ask(policy, security_labels=frozenset({"HIV", "R"})).permit


def test_deny_by_label_reads_eth_as_sud_and_widens_on_a_confidentiality_code_in_act_code() -> None:
    doc = full_consent()
    doc["provision"]["securityLabel"] = [{"system": ACT_CODE, "code": "SUD"}]
    doc["provision"]["provision"] = [{"type": "deny", "securityLabel": [{"system": ACT_CODE, "code": "ETH"}]}]
    policy = parse(doc)
    assert ask(policy, security_labels=frozenset({"SUD", "R"})).rule == "deny.provision.deny"
    assert ask(policy).permit
    doc["provision"]["provision"] = [{"type": "deny", "securityLabel": [{"system": ACT_CODE, "code": "R"}]}]
    assert ask(parse(doc)).rule == "deny.provision.deny"  # unreadable label: the deny covers everything


def test_references_must_be_local() -> None:
    doc = full_consent() | {"patient": {"reference": "https://elsewhere.example/fhir/Patient/pat-1"}}
    assert ask(parse(doc)).rule == "deny.default.no-consent"


def test_partial_and_instant_dates() -> None:
    doc = full_consent()
    doc["provision"]["period"] = {"start": "2025-05-31T22:00:00.5-02:00", "end": "2025-06"}
    policy = parse(doc)
    assert policy.period_start == dt.datetime(2025, 6, 1, 0, 0, 0, 500000, tzinfo=UTC)
    assert policy.period_end == dt.datetime(2025, 7, 1, tzinfo=UTC)
    doc["provision"]["period"] = {"end": "9999-12-31"}
    assert parse(doc).period_end is None


def test_org_identifier_system_matches_the_organization_module() -> None:
    from service.identity.organizations import ORG_IDENTIFIER_SYSTEM as SERVICE_SYSTEM

    assert SERVICE_SYSTEM == ORG_IDENTIFIER_SYSTEM


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
PATHS = [
    (),
    ("status",),
    ("patient",),
    ("scope",),
    ("policy",),
    ("provision",),
    ("provision", "type"),
    ("provision", "period"),
    ("provision", "actor"),
    ("provision", "purpose"),
    ("provision", "class"),
    ("provision", "securityLabel"),
    ("provision", "provision"),
]


@settings(max_examples=150, deadline=None)
@given(path=st.sampled_from(PATHS), junk=json_values)
def test_any_shape_parses_without_raising(path: tuple[str, ...], junk: Any) -> None:
    doc: Any = copy.deepcopy(full_consent())
    if not path:
        doc = junk
    else:
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = junk
    policy = parse(doc)
    decision = ask(policy)
    # Junk can only take away: the undamaged consent permits exactly this.
    if decision.permit:
        assert policy.patient_id == "pat-1" and "org-cdc" in policy.provision.actors


@pytest.mark.parametrize("junk", [None, 42, "Consent", [], {"resourceType": "Patient"}])
def test_not_a_consent(junk: Any) -> None:
    policy = parse(junk)
    assert not ask(policy).permit

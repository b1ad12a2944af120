"""Security labels: the sensitivity ValueSets in fhir/ and the label set that decides disclosure."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from security.consent import GRANTABLE_LABELS
from service.fhir_validation.ig import ImplementationGuide
from service.records.labels import RULE_FILES, SecurityLabeler, label_of, read_rule

FHIR = Path(__file__).resolve().parents[2] / "fhir"
EXAMPLES = FHIR / "examples"

ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
OBSERVATION_VALUE = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
ATC = "http://www.whocc.no/atc"
CVX = "http://hl7.org/fhir/sid/cvx"
RESTRICTED = {"system": CONFIDENTIALITY, "code": "R", "display": "restricted"}


@pytest.fixture(scope="module")
def labeler() -> SecurityLabeler:
    return SecurityLabeler.load(FHIR)


def cc(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


def observation(code: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final", "code": code, **extra}


def condition(system: str, code: str) -> dict[str, Any]:
    return {"resourceType": "Condition", "code": cc(system, code), "subject": {"reference": "Patient/p"}}


def security_codes(resource: dict[str, Any]) -> list[tuple[str, str]]:
    return [(c["system"], c["code"]) for c in resource["meta"]["security"]]


# ---------------------------------------------------------------------------- the rules as data


def test_rules_are_the_sensitive_value_sets(labeler: SecurityLabeler) -> None:
    names = sorted(p.name for p in FHIR.glob(RULE_FILES))
    assert names == [
        "ValueSet-mhr-sensitive-hiv.json",
        "ValueSet-mhr-sensitive-mental-health.json",
        "ValueSet-mhr-sensitive-sti.json",
        "ValueSet-mhr-sensitive-substance-use.json",
    ]
    assert {r.label for r in labeler.rules} == {"HIV", "PSY", "STD", "SUD"}
    assert labeler.label_universe == GRANTABLE_LABELS


def test_value_sets_expand_with_the_guide_loader() -> None:
    """A standard reader (here the service's own IG loader) sees the same codes the labeler uses."""
    ig = ImplementationGuide.load(FHIR)
    for path in FHIR.glob(RULE_FILES):
        data = json.loads(path.read_text())
        rule = read_rule(data, path.name)
        expanded = ig.expand(data["url"])
        assert expanded, path.name
        exact = {(s, c) for s, c in expanded if (s, c.replace(".", "").upper()) not in rule.prefixes}
        assert exact == set(rule.exact), path.name
        assert data["useContext"][0]["code"]["code"] == "focus"


@pytest.mark.parametrize("path", sorted(FHIR.glob(RULE_FILES)), ids=lambda p: p.name)
def test_every_listed_concept_labels_a_condition(labeler: SecurityLabeler, path: Path) -> None:
    data = json.loads(path.read_text())
    label = read_rule(data, path.name).label
    for include in data["compose"]["include"]:
        for concept in include["concept"]:
            got = labeler.labels_for(condition(include["system"], concept["code"]))
            assert label in got, (include["system"], concept["code"])


# ---------------------------------------------------------------------------- codes -> labels

# Issue 11 item 3 names the first codes of each family; the rest cover each family and system.
FAMILY_CODES: list[tuple[str, str, str]] = [
    # HIV
    (SNOMED, "86406008", "HIV"),
    (SNOMED, "62479008", "HIV"),
    (LOINC, "56888-1", "HIV"),
    (LOINC, "7917-8", "HIV"),
    (LOINC, "75622-1", "HIV"),
    (LOINC, "20447-9", "HIV"),
    (ICD10, "B20.1", "HIV"),
    (ICD10, "B24", "HIV"),
    (ICD10, "Z21", "HIV"),
    (ICD10CM, "B20", "HIV"),
    (ICD10CM, "Z21", "HIV"),
    (ICD10CM, "O98.72", "HIV"),
    (ATC, "J05AR03", "HIV"),  # tenofovir disoproxil and emtricitabine (PrEP)
    (ATC, "J05AG03", "HIV"),  # efavirenz
    # Syphilis and other STIs
    (ICD10, "A53.9", "STD"),
    (ICD10, "A51.0", "STD"),
    (ICD10, "A54.0", "STD"),  # gonococcal infection
    (ICD10, "A56.0", "STD"),  # chlamydial infection
    (ICD10, "A64", "STD"),
    (ICD10CM, "A53.9", "STD"),
    (ICD10CM, "Z20.2", "STD"),
    (SNOMED, "76272004", "STD"),
    (SNOMED, "15628003", "STD"),
    (LOINC, "20507-0", "STD"),  # RPR
    (LOINC, "24110-9", "STD"),  # treponemal antibody
    (LOINC, "21613-5", "STD"),  # chlamydia NAA
    (LOINC, "24111-7", "STD"),  # gonorrhoea NAA
    # Mental health
    (SNOMED, "35489007", "PSY"),
    (SNOMED, "47505003", "PSY"),  # PTSD
    (ICD10, "F32.1", "PSY"),
    (ICD10, "F321", "PSY"),
    (ICD10, "F00.0", "PSY"),
    (ICD10, "F99", "PSY"),
    (ICD10, "X70", "PSY"),  # intentional self-harm
    (ICD10CM, "F32.A", "PSY"),
    (ICD10CM, "F43.10", "PSY"),
    (ICD10CM, "R45.851", "PSY"),
    # Substance use
    (SNOMED, "7200002", "SUD"),
    (SNOMED, "75544000", "SUD"),
    (ICD10, "F10.2", "SUD"),
    (ICD10, "f10.2", "SUD"),  # case is normalised: over-labelling is the safe direction
    (ICD10, "F19", "SUD"),
    (ICD10CM, "F11.20", "SUD"),
    (ICD10CM, "F15.10", "SUD"),
]

NOT_SENSITIVE: list[tuple[str, str]] = [
    (ICD10, "F17.2"),  # tobacco deliberately not labelled
    (ICD10, "A15.0"),  # pulmonary TB
    (ICD10, "B18.1"),  # chronic hepatitis B: deliberately not labelled
    (ICD10, "F"),  # shorter than every listed code
    (ICD10, "A6"),
    (ICD10CM, "F17.210"),
    (LOINC, "5196-1"),  # HBsAg of the exam
    (LOINC, "36643-5"),  # chest X-ray
    (SNOMED, "F32.1"),  # prefixes only apply to hierarchical systems
    (SNOMED, "860"),  # ...and SNOMED CT matches exactly
    (LOINC, "B20"),
    (CVX, "88"),  # vaccines are not sensitive
    (ATC, "J05AB01"),  # aciclovir
    (ATC, "J05"),  # a parent of the listed groups is not itself listed
]

Place = Callable[[dict[str, Any]], dict[str, Any]]

# Where a code can sit in each labelled resource type (FHIR R4 elements that carry codes).
PLACEMENTS: list[tuple[str, str, Place]] = [
    ("Observation", "code", lambda c: {"code": c}),
    ("Observation", "category", lambda c: {"category": [c]}),
    ("Observation", "valueCodeableConcept", lambda c: {"valueCodeableConcept": c}),
    ("Observation", "component.code", lambda c: {"component": [{"code": cc(LOINC, "0-0")}, {"code": c}]}),
    ("Observation", "component.valueCodeableConcept", lambda c: {"component": [{"valueCodeableConcept": c}]}),
    (
        "Observation",
        "extension.valueCodeableConcept",
        lambda c: {"extension": [{"url": "urn:x", "valueCodeableConcept": c}]},
    ),
    ("Condition", "code", lambda c: {"code": c}),
    ("Condition", "category", lambda c: {"category": [c]}),
    ("Condition", "evidence.code", lambda c: {"evidence": [{"code": [c]}]}),
    ("DiagnosticReport", "code", lambda c: {"code": c}),
    ("DiagnosticReport", "category", lambda c: {"category": [c]}),
    ("DiagnosticReport", "conclusionCode", lambda c: {"conclusionCode": [c]}),
    ("MedicationAdministration", "medicationCodeableConcept", lambda c: {"medicationCodeableConcept": c}),
    ("MedicationAdministration", "reasonCode", lambda c: {"reasonCode": [c]}),
    (
        "MedicationAdministration",
        "contained Medication.code",
        lambda c: {
            "contained": [{"resourceType": "Medication", "id": "m", "code": c}],
            "medicationReference": {"reference": "#m"},
        },
    ),
    ("MedicationRequest", "medicationCodeableConcept", lambda c: {"medicationCodeableConcept": c}),
    ("MedicationStatement", "reasonCode", lambda c: {"reasonCode": [c]}),
    ("MedicationDispense", "medicationCodeableConcept", lambda c: {"medicationCodeableConcept": c}),
    ("Procedure", "code", lambda c: {"code": c}),
    ("Procedure", "reasonCode", lambda c: {"reasonCode": [c]}),
    ("Encounter", "type", lambda c: {"type": [c]}),
    ("Encounter", "reasonCode", lambda c: {"reasonCode": [c]}),
    ("Encounter", "serviceType", lambda c: {"serviceType": c}),
    ("Immunization", "reasonCode", lambda c: {"reasonCode": [c]}),
    ("DocumentReference", "type", lambda c: {"type": c}),
    ("DocumentReference", "category", lambda c: {"category": [c]}),
    ("DocumentReference", "context.event", lambda c: {"context": {"event": [c]}}),
    ("ImagingStudy", "reasonCode", lambda c: {"reasonCode": [c]}),
    ("Specimen", "type", lambda c: {"type": c}),
]


@pytest.mark.parametrize(
    ("system", "code", "label"), FAMILY_CODES, ids=[f"{c[2]}-{c[1]}" for c in FAMILY_CODES]
)
def test_family_code_labels_every_type_and_element(
    labeler: SecurityLabeler, system: str, code: str, label: str
) -> None:
    for resource_type, element, place in PLACEMENTS:
        concept = {"coding": [{"system": "urn:other", "code": "x"}, {"system": system, "code": code}]}
        resource = {"resourceType": resource_type, **place(concept)}
        assert labeler.labels_for(resource) == {label}, (resource_type, element)
        applied = copy.deepcopy(resource)
        assert labeler.apply(applied) == {label, "R"}, (resource_type, element)
        assert security_codes(applied) == [(ACT_CODE, label), (CONFIDENTIALITY, "R")]
    # A bare Coding (not a CodeableConcept) counts too.
    assert labeler.labels_for(observation({"system": system, "code": code})) == {label}


@pytest.mark.parametrize(("system", "code"), NOT_SENSITIVE, ids=[c[1] for c in NOT_SENSITIVE])
def test_codes_outside_the_families_label_nothing(labeler: SecurityLabeler, system: str, code: str) -> None:
    for resource_type, element, place in PLACEMENTS:
        resource = {"resourceType": resource_type, **place(cc(system, code))}
        before = copy.deepcopy(resource)
        assert labeler.apply(resource) == frozenset(), (resource_type, element)
        assert resource == before


def test_several_families_at_once(labeler: SecurityLabeler) -> None:
    encounter = {
        "resourceType": "Encounter",
        "reasonCode": [cc(ICD10, "F41.1"), cc(ICD10, "F12.1"), cc(ICD10, "A53.9")],
    }
    assert labeler.labels_for(encounter) == {"PSY", "SUD", "STD"}
    assert labeler.apply(encounter) == {"PSY", "SUD", "STD", "R"}
    assert security_codes(encounter) == [
        (ACT_CODE, "PSY"),
        (ACT_CODE, "STD"),
        (ACT_CODE, "SUD"),
        (CONFIDENTIALITY, "R"),
    ]


def test_codes_in_meta_and_unlabelled_types_do_not_count(labeler: SecurityLabeler) -> None:
    tagged = observation(cc(LOINC, "29463-7"), meta={"tag": [{"system": LOINC, "code": "75622-1"}]})
    assert labeler.labels_for(tagged) == frozenset()
    for resource_type in ("Patient", "Consent", "Provenance", "Bundle"):
        resource = {"resourceType": resource_type, "code": cc(LOINC, "75622-1")}
        before = copy.deepcopy(resource)
        assert labeler.apply(resource) == frozenset()
        assert resource == before


def test_chest_xray_gets_nothing_and_meta_untouched(labeler: SecurityLabeler) -> None:
    cxr = observation(
        cc(LOINC, "36643-5"),
        meta={"profile": ["https://mhr.example.org/fhir/StructureDefinition/mhr-chest-xray"]},
        component=[
            {
                "code": cc("https://mhr.example.org/fhir/CodeSystem/observation-code", "cxr-finding"),
                "valueCodeableConcept": cc("https://mhr.example.org/fhir/CodeSystem/cxr-finding", "normal"),
            }
        ],
    )
    before = copy.deepcopy(cxr)
    assert labeler.apply(cxr) == frozenset()
    assert cxr == before
    bare = observation(cc(LOINC, "36643-5"))
    assert labeler.apply(bare) == frozenset()
    assert "meta" not in bare


def test_tolerates_odd_shapes(labeler: SecurityLabeler) -> None:
    obs = observation(
        {"coding": [None, {"system": LOINC}, {"code": "75622-1"}, {"system": LOINC, "code": 5}], "text": "x"},
        component=["nonsense", {"code": None}],
        valueCodeableConcept={"system": LOINC, "code": "75622-1"},
    )
    assert labeler.labels_for(obs) == {"HIV"}


# ---------------------------------------------------------------------------- labels already there

# How each meta.security coding enters the label set (issue 11 item 2: unknown labels fail closed).
LABEL_SET_ENTRIES: list[tuple[Any, str | None]] = [
    ({"system": ACT_CODE, "code": "HIV"}, "HIV"),
    ({"system": ACT_CODE, "code": "STD"}, "STD"),
    ({"system": ACT_CODE, "code": "MH"}, "MH"),
    ({"system": ACT_CODE, "code": "SDV"}, "SDV"),
    ({"system": ACT_CODE, "code": "PSY"}, "PSY"),
    ({"system": ACT_CODE, "code": "SUD"}, "SUD"),
    ({"system": ACT_CODE, "code": "ETH"}, "SUD"),
    ({"system": ACT_CODE, "code": "SEX"}, "SEX"),  # sensitivity code the service cannot grant
    ({"system": ACT_CODE, "code": "NODSCLCD"}, f"{ACT_CODE}|NODSCLCD"),  # refrain policy
    ({"system": ACT_CODE, "code": "R"}, f"{ACT_CODE}|R"),  # not the confidentiality code
    ({"system": ACT_CODE, "code": "XYZ"}, f"{ACT_CODE}|XYZ"),
    ({"system": CONFIDENTIALITY, "code": "R"}, "R"),
    ({"system": CONFIDENTIALITY, "code": "V"}, "V"),
    ({"system": CONFIDENTIALITY, "code": "N"}, None),
    ({"system": CONFIDENTIALITY, "code": "U"}, None),
    ({"system": CONFIDENTIALITY, "code": "Q"}, f"{CONFIDENTIALITY}|Q"),
    ({"system": ACT_REASON, "code": "HTEST"}, None),
    ({"system": OBSERVATION_VALUE, "code": "PSEUDED"}, None),
    ({"system": OBSERVATION_VALUE, "code": "HTEST"}, f"{OBSERVATION_VALUE}|HTEST"),
    ({"system": "urn:clinic:labels", "code": "HIV"}, "urn:clinic:labels|HIV"),
    ({"code": "HIV"}, "|HIV"),
    ({"system": ACT_CODE}, f"{ACT_CODE}|"),
    ({"system": ACT_CODE, "code": 5}, f"{ACT_CODE}|"),
    ("HIV", "|"),
]


@pytest.mark.parametrize(("coding", "entry"), LABEL_SET_ENTRIES, ids=[str(e[0]) for e in LABEL_SET_ENTRIES])
def test_label_set_entry(coding: Any, entry: str | None) -> None:
    assert label_of(coding) == entry
    # Nothing a consent can name (bare codes) equals an entry for an unknown label.
    if entry is not None and "|" in entry:
        assert entry not in GRANTABLE_LABELS


@pytest.mark.parametrize("code", ["STD", "MH", "SDV"])
def test_clinic_supplied_sensitivity_label_is_kept_with_restricted(
    labeler: SecurityLabeler, code: str
) -> None:
    obs = observation(cc(LOINC, "29463-7"), meta={"security": [{"system": ACT_CODE, "code": code}]})
    assert labeler.labels_for(obs) == frozenset()
    assert labeler.apply(obs) == {code, "R"}
    assert security_codes(obs) == [(ACT_CODE, code), (CONFIDENTIALITY, "R")]


def test_unknown_labels_stay_in_the_label_set(labeler: SecurityLabeler) -> None:
    obs = observation(
        cc(LOINC, "29463-7"),
        meta={
            "security": [{"system": "urn:clinic", "code": "secret"}, {"system": ACT_CODE, "code": "NOREUSE"}]
        },
    )
    before = copy.deepcopy(obs)
    assert labeler.apply(obs) == {"urn:clinic|secret", f"{ACT_CODE}|NOREUSE"}
    assert obs == before  # no sensitivity label: meta.security stays as it was


def test_confidentiality_alone(labeler: SecurityLabeler) -> None:
    for code, expected in (("R", {"R"}), ("V", {"V"}), ("N", set())):
        obs = observation(
            cc(LOINC, "29463-7"), meta={"security": [{"system": CONFIDENTIALITY, "code": code}]}
        )
        before = copy.deepcopy(obs)
        assert labeler.apply(obs) == expected
        assert obs == before


def test_existing_eth_becomes_sud(labeler: SecurityLabeler) -> None:
    obs = observation(cc(LOINC, "29463-7"), meta={"security": [{"system": ACT_CODE, "code": "ETH"}]})
    assert labeler.apply(obs) == {"SUD", "R"}
    assert security_codes(obs) == [(ACT_CODE, "SUD"), (CONFIDENTIALITY, "R")]


def test_existing_labels_are_united_and_deduplicated(labeler: SecurityLabeler) -> None:
    cond = condition(ICD10, "F10.2")
    cond["meta"] = {
        "security": [
            {"system": ACT_CODE, "code": "PSY"},
            {"system": ACT_CODE, "code": "ETH"},
            {"system": ACT_CODE, "code": "SUD"},
        ]
    }
    assert labeler.apply(cond) == {"PSY", "SUD", "R"}
    assert security_codes(cond) == [(ACT_CODE, "PSY"), (ACT_CODE, "SUD"), (CONFIDENTIALITY, "R")]


def test_unrelated_security_codings_kept_in_place(labeler: SecurityLabeler) -> None:
    cond = condition(ICD10, "F32.1")
    cond["meta"] = {
        "versionId": "2",
        "security": [
            {"system": ACT_REASON, "code": "HTEST"},
            {"system": ACT_CODE, "code": "TBOO"},  # sensitivity code no consent can grant
            {"system": ACT_CODE, "code": "PSY"},
            {"system": CONFIDENTIALITY, "code": "N"},  # weaker than R: replaced
        ],
    }
    assert labeler.apply(cond) == {"PSY", "TBOO", "R"}
    assert cond["meta"]["versionId"] == "2"
    assert security_codes(cond) == [
        (ACT_REASON, "HTEST"),
        (ACT_CODE, "TBOO"),
        (ACT_CODE, "PSY"),
        (CONFIDENTIALITY, "R"),
    ]


def test_stronger_confidentiality_is_kept(labeler: SecurityLabeler) -> None:
    cond = condition(ICD10, "B20")
    cond["meta"] = {"security": [{"system": CONFIDENTIALITY, "code": "V"}]}
    assert labeler.apply(cond) == {"HIV", "V"}
    assert security_codes(cond) == [(CONFIDENTIALITY, "V"), (ACT_CODE, "HIV")]


def test_document_reference_security_label_counts(labeler: SecurityLabeler) -> None:
    doc = {
        "resourceType": "DocumentReference",
        "type": cc(LOINC, "34108-1"),
        "securityLabel": [cc(ACT_CODE, "HIV"), cc("urn:clinic", "private")],
    }
    assert labeler.labels_for(doc) == frozenset()
    assert labeler.apply(doc) == {"HIV", "R", "urn:clinic|private"}
    assert security_codes(doc) == [(ACT_CODE, "HIV"), (CONFIDENTIALITY, "R")]


def test_apply_is_idempotent_and_deterministic(labeler: SecurityLabeler) -> None:
    enc = {
        "resourceType": "Encounter",
        "meta": {"security": [{"system": ACT_CODE, "code": "ETH"}, {"system": "urn:x", "code": "y"}]},
        "reasonCode": [cc(ICD10, "F32.1"), cc(ICD10, "B20.1")],
    }
    first = labeler.apply(enc)
    once = copy.deepcopy(enc)
    assert labeler.apply(enc) == first == {"HIV", "PSY", "SUD", "R", "urn:x|y"}
    assert enc == once
    assert security_codes(enc) == [
        (ACT_CODE, "SUD"),
        ("urn:x", "y"),
        (ACT_CODE, "HIV"),
        (ACT_CODE, "PSY"),
        (CONFIDENTIALITY, "R"),
    ]


def test_bad_meta_shape(labeler: SecurityLabeler) -> None:
    cond = condition(ICD10, "B20")
    cond["meta"] = {"security": "HIV"}
    with pytest.raises(ValueError, match=r"meta\.security"):
        labeler.apply(cond)


# ---------------------------------------------------------------------------- examples

# Which labels each example's entries get: {file: {entry index: labels}}; unlisted entries get none.
# The exams carry syphilis serology (RPR): sexually transmitted infection information.
EXPECTED_EXAMPLE_LABELS: dict[str, dict[int, set[str]]] = {
    "exam-adult-b1-pulmonary.json": {},
    "exam-adult-normal.json": {},
    "exam-child-igra-b2.json": {},
    "exam-refugee-vaccinations.json": {},
}


def _example_labels(labeler: SecurityLabeler, name: str) -> dict[int, frozenset[str]]:
    bundle = json.loads((EXAMPLES / name).read_text())
    got = {}
    for i, entry in enumerate(bundle["entry"]):
        resource = entry["resource"]
        before = copy.deepcopy(resource)
        labels = labeler.apply(resource)
        if labels:
            got[i] = labels
        else:
            assert resource == before
    return got


def test_every_example_is_listed() -> None:
    assert {p.name for p in EXAMPLES.glob("*.json")} == set(EXPECTED_EXAMPLE_LABELS)


@pytest.mark.parametrize("name", sorted(EXPECTED_EXAMPLE_LABELS))
def test_example_bundle_labels(labeler: SecurityLabeler, name: str) -> None:
    bundle = json.loads((EXAMPLES / name).read_text())
    rpr = {
        i
        for i, e in enumerate(bundle["entry"])
        if any(c.get("code") == "20507-0" for c in e["resource"].get("code", {}).get("coding", []))
    }
    expected = {i: {"STD", "R"} for i in rpr} | EXPECTED_EXAMPLE_LABELS[name]
    assert _example_labels(labeler, name) == expected


# ---------------------------------------------------------------------------- malformed rules


def _rule() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FHIR / "ValueSet-mhr-sensitive-hiv.json").read_text())
    return data


def _mutate(path: list[Any], value: Any = KeyError) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        node: Any = data
        for key in path[:-1]:
            node = node[key]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value

    return mutate


MALFORMED: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("not a ValueSet", _mutate(["resourceType"], "CodeSystem"), "not a ValueSet"),
    ("no url", _mutate(["url"]), "url"),
    ("draft", _mutate(["status"], "draft"), "active"),
    ("no useContext", _mutate(["useContext"]), "useContext"),
    (
        "label of another system",
        _mutate(["useContext", 0, "valueCodeableConcept", "coding", 0, "system"], "urn:x"),
        "useContext",
    ),
    (
        "label not grantable",
        _mutate(["useContext", 0, "valueCodeableConcept", "coding", 0, "code"], "SEX"),
        "cannot|can grant",
    ),
    ("label is R", _mutate(["useContext", 0, "valueCodeableConcept", "coding", 0, "code"], "R"), "can grant"),
    ("useContext not focus", _mutate(["useContext", 0, "code", "code"], "venue"), "useContext"),
    ("no compose", _mutate(["compose"]), "compose"),
    (
        "exclude",
        _mutate(["compose", "exclude"], [{"system": LOINC, "concept": [{"code": "1-8"}]}]),
        "exclude",
    ),
    ("include empty", _mutate(["compose", "include"], []), "include"),
    (
        "filter",
        _mutate(["compose", "include", 0, "filter"], [{"property": "concept", "op": "is-a", "value": "x"}]),
        "filter",
    ),
    ("valueSet", _mutate(["compose", "include", 0, "valueSet"], ["urn:vs"]), "valueSet"),
    ("no system", _mutate(["compose", "include", 0, "system"]), "system"),
    ("no concepts", _mutate(["compose", "include", 0, "concept"]), "concept"),
    ("code missing", _mutate(["compose", "include", 0, "concept", 0, "code"]), r"concept\[0\]"),
    (
        "code with spaces",
        _mutate(["compose", "include", 0, "concept", 1, "code"], " 7917-8"),
        r"concept\[1\]",
    ),
]


@pytest.mark.parametrize(("case", "mutate", "message"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_rule_is_refused(tmp_path: Path, case: str, mutate: Any, message: str) -> None:
    data = _rule()
    mutate(data)
    (tmp_path / "ValueSet-mhr-sensitive-hiv.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        SecurityLabeler.load(tmp_path)


@pytest.mark.parametrize("text", ["", "{", "[]", '"rules"', "null"])
def test_not_a_rules_document(tmp_path: Path, text: str) -> None:
    (tmp_path / "ValueSet-mhr-sensitive-x.json").write_text(text)
    with pytest.raises(ValueError, match="security label rules"):
        SecurityLabeler.load(tmp_path)


def test_no_rules_at_all_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no ValueSet-mhr-sensitive"):
        SecurityLabeler.load(tmp_path)

"""Sensitivity security labels from service/records/security-label-rules.json."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from service.records.labels import RULES_FILE, SecurityLabeler

FHIR = Path(__file__).resolve().parents[2] / "fhir"
RULES = RULES_FILE
EXAMPLES = FHIR / "examples"

ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
RESTRICTED = {"system": CONFIDENTIALITY, "code": "R", "display": "restricted"}


@pytest.fixture(scope="module")
def labeler() -> SecurityLabeler:
    return SecurityLabeler.load(RULES)


def cc(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


def observation(code: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final", "code": code, **extra}


def condition(system: str, code: str) -> dict[str, Any]:
    return {"resourceType": "Condition", "code": cc(system, code), "subject": {"reference": "Patient/p"}}


def security_codes(resource: dict[str, Any]) -> list[tuple[str, str]]:
    return [(c["system"], c["code"]) for c in resource["meta"]["security"]]


def test_universe(labeler: SecurityLabeler) -> None:
    assert labeler.label_universe == frozenset({"HIV", "PSY", "SUD"})


def test_hiv_test_observation_gets_hiv_and_restricted(labeler: SecurityLabeler) -> None:
    obs = observation(cc(LOINC, "75622-1"), valueCodeableConcept=cc(SNOMED, "260385009"))
    assert labeler.labels_for(obs) == {"HIV"}
    assert labeler.apply(obs) == {"HIV"}
    assert obs["meta"]["security"] == [
        {"system": ACT_CODE, "code": "HIV", "display": "HIV/AIDS information sensitivity"},
        RESTRICTED,
    ]


@pytest.mark.parametrize(
    ("system", "code", "expected"),
    [
        (ICD10, "F32.1", {"PSY"}),
        (ICD10, "F321", {"PSY"}),
        (ICD10CM, "F32.A", {"PSY"}),
        (ICD10, "F99", {"PSY"}),
        (ICD10, "F00.0", {"PSY"}),
        (ICD10, "F10.2", {"SUD"}),
        (ICD10, "F19", {"SUD"}),
        (ICD10CM, "F11.20", {"SUD"}),
        (ICD10, "f10.2", {"SUD"}),  # case is normalised: over-labelling is the safe direction
        (ICD10, "F17.2", set()),  # tobacco deliberately not labelled
        (ICD10, "B20.1", {"HIV"}),
        (ICD10, "Z21", {"HIV"}),
        (ICD10CM, "B20", {"HIV"}),
        (ICD10CM, "B24", set()),  # the icd-10-cm rule only lists B20 and Z21
        (ICD10, "A15.0", set()),  # pulmonary TB
        (ICD10, "F", set()),  # shorter than every prefix
        (SNOMED, "111880001", {"HIV"}),
        (SNOMED, "F32.1", set()),  # prefixes only apply to their own system
        (LOINC, "B20", set()),
    ],
)
def test_condition_codes(labeler: SecurityLabeler, system: str, code: str, expected: set[str]) -> None:
    assert labeler.labels_for(condition(system, code)) == expected


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


def test_component_code_and_value_match(labeler: SecurityLabeler) -> None:
    panel = observation(
        cc(LOINC, "24360-0"),
        component=[
            {"code": cc(LOINC, "718-7")},
            {"code": {"coding": [{"system": LOINC, "code": "0-0"}, {"system": LOINC, "code": "25836-8"}]}},
        ],
    )
    assert labeler.labels_for(panel) == {"HIV"}
    dx = observation(
        cc(LOINC, "11450-4"),
        component=[{"code": cc(LOINC, "29308-4"), "valueCodeableConcept": cc(ICD10, "F33.1")}],
    )
    assert labeler.labels_for(dx) == {"PSY"}


def test_other_elements_and_types(labeler: SecurityLabeler) -> None:
    report = {
        "resourceType": "DiagnosticReport",
        "code": cc(LOINC, "11502-2"),
        "conclusionCode": [cc(ICD10, "B20")],
    }
    assert labeler.labels_for(report) == {"HIV"}
    encounter = {"resourceType": "Encounter", "reasonCode": [cc(ICD10, "F41.1"), cc(ICD10, "F12.1")]}
    assert labeler.labels_for(encounter) == {"PSY", "SUD"}
    med = {"resourceType": "MedicationAdministration", "medicationCodeableConcept": cc(ICD10, "F11")}
    assert labeler.labels_for(med) == {"SUD"}
    # A Coding outside the listed elements does not count.
    obs = observation(cc(LOINC, "29463-7"), category=[cc(ICD10, "F32")], note=[{"text": "F32.1"}])
    assert labeler.labels_for(obs) == frozenset()


def test_unlisted_resource_type_gets_nothing(labeler: SecurityLabeler) -> None:
    for resource_type in ("Patient", "Immunization", "DocumentReference", "Bundle"):
        resource = {"resourceType": resource_type, "code": cc(LOINC, "75622-1")}
        before = copy.deepcopy(resource)
        assert labeler.labels_for(resource) == frozenset()
        assert labeler.apply(resource) == frozenset()
        assert resource == before
    assert labeler.labels_for({"code": cc(LOINC, "75622-1")}) == frozenset()


def test_existing_eth_becomes_sud(labeler: SecurityLabeler) -> None:
    obs = observation(cc(LOINC, "29463-7"), meta={"security": [{"system": ACT_CODE, "code": "ETH"}]})
    assert labeler.labels_for(obs) == frozenset()
    assert labeler.apply(obs) == {"SUD"}
    assert security_codes(obs) == [(ACT_CODE, "SUD"), (CONFIDENTIALITY, "R")]
    # ETH of another system is not a sensitivity label.
    other = observation(cc(LOINC, "29463-7"), meta={"security": [{"system": "urn:x", "code": "ETH"}]})
    before = copy.deepcopy(other)
    assert labeler.apply(other) == frozenset()
    assert other == before


def test_existing_labels_are_united(labeler: SecurityLabeler) -> None:
    obs = condition(ICD10, "F10.2")
    obs["meta"] = {"security": [{"system": ACT_CODE, "code": "PSY"}, {"system": ACT_CODE, "code": "SUD"}]}
    assert labeler.apply(obs) == {"PSY", "SUD"}
    assert security_codes(obs) == [(ACT_CODE, "PSY"), (ACT_CODE, "SUD"), (CONFIDENTIALITY, "R")]


def test_unrelated_security_codings_kept_in_place(labeler: SecurityLabeler) -> None:
    obs = condition(ICD10, "F32.1")
    obs["meta"] = {
        "versionId": "2",
        "security": [
            {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "HTEST"},
            {"system": ACT_CODE, "code": "TBOO"},  # sensitivity code outside the universe: not ours
            {"system": ACT_CODE, "code": "PSY"},
            {"system": ACT_CODE, "code": "PSY"},
            {"system": CONFIDENTIALITY, "code": "N"},  # weaker than R: replaced
        ],
    }
    assert labeler.apply(obs) == {"PSY"}
    assert obs["meta"]["versionId"] == "2"
    assert security_codes(obs) == [
        ("http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "HTEST"),
        (ACT_CODE, "TBOO"),
        (ACT_CODE, "PSY"),
        (CONFIDENTIALITY, "R"),
    ]


def test_stronger_confidentiality_is_kept(labeler: SecurityLabeler) -> None:
    obs = condition(ICD10, "B20")
    obs["meta"] = {"security": [{"system": CONFIDENTIALITY, "code": "V"}]}
    assert labeler.apply(obs) == {"HIV"}
    assert security_codes(obs) == [(CONFIDENTIALITY, "V"), (ACT_CODE, "HIV")]


def test_apply_is_idempotent_and_deterministic(labeler: SecurityLabeler) -> None:
    enc = {
        "resourceType": "Encounter",
        "meta": {"security": [{"system": ACT_CODE, "code": "ETH"}, {"system": "urn:x", "code": "y"}]},
        "reasonCode": [cc(ICD10, "F32.1"), cc(ICD10, "B20.1")],
    }
    first = labeler.apply(enc)
    once = copy.deepcopy(enc)
    assert labeler.apply(enc) == first == {"HIV", "PSY", "SUD"}
    assert enc == once
    assert security_codes(enc) == [
        ("urn:x", "y"),
        (ACT_CODE, "HIV"),
        (ACT_CODE, "PSY"),
        (ACT_CODE, "SUD"),
        (CONFIDENTIALITY, "R"),
    ]


def test_bad_meta_shape(labeler: SecurityLabeler) -> None:
    obs = condition(ICD10, "B20")
    obs["meta"] = {"security": "HIV"}
    with pytest.raises(ValueError, match=r"meta\.security"):
        labeler.apply(obs)


def test_tolerates_odd_shapes(labeler: SecurityLabeler) -> None:
    obs = observation(
        {"coding": [None, {"system": LOINC}, {"code": "75622-1"}, {"system": LOINC, "code": 5}], "text": "x"},
        component=["nonsense", {"code": None}],
        valueCodeableConcept={"system": LOINC, "code": "75622-1"},  # a bare Coding still counts
    )
    assert labeler.labels_for(obs) == {"HIV"}


# ---------------------------------------------------------------------------- examples

# Which labels each example's entries get: {file: {entry index: labels}}; unlisted entries get none.
# None of the example exams carries an HIV test, a mental-health or a substance-use code.
EXPECTED_EXAMPLE_LABELS: dict[str, dict[int, set[str]]] = {
    "exam-adult-b1-pulmonary.json": {},
    "exam-adult-normal.json": {},
    "exam-child-igra-b2.json": {},
    "exam-refugee-vaccinations.json": {},
}


def test_every_example_is_listed() -> None:
    assert {p.name for p in EXAMPLES.glob("*.json")} == set(EXPECTED_EXAMPLE_LABELS)


@pytest.mark.parametrize("name", sorted(EXPECTED_EXAMPLE_LABELS))
def test_example_bundle_labels(labeler: SecurityLabeler, name: str) -> None:
    bundle = json.loads((EXAMPLES / name).read_text())
    expected = EXPECTED_EXAMPLE_LABELS[name]
    for i, entry in enumerate(bundle["entry"]):
        resource = entry["resource"]
        before = copy.deepcopy(resource)
        labels = labeler.apply(resource)
        assert labels == expected.get(i, set()), (name, i, resource["resourceType"])
        if not labels:
            assert resource == before


def test_example_with_added_hiv_serology(labeler: SecurityLabeler) -> None:
    bundle = json.loads((EXAMPLES / "exam-adult-normal.json").read_text())
    hiv = observation(
        cc(LOINC, "75622-1"),
        category=[cc("http://terminology.hl7.org/CodeSystem/observation-category", "laboratory")],
        valueCodeableConcept=cc(SNOMED, "260385009"),
    )
    bundle["entry"].append({"fullUrl": "urn:uuid:hiv", "resource": hiv})
    got = {i: labeler.apply(e["resource"]) for i, e in enumerate(bundle["entry"])}
    assert {i: labels for i, labels in got.items() if labels} == {len(bundle["entry"]) - 1: {"HIV"}}


# ---------------------------------------------------------------------------- malformed rules


def rules() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(RULES.read_text())
    return data


def _drop(path: list[Any]) -> Any:
    def mutate(data: dict[str, Any]) -> None:
        node: Any = data
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return mutate


def _set(path: list[Any], value: Any) -> Any:
    def mutate(data: dict[str, Any]) -> None:
        node: Any = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


MALFORMED = [
    ("no labelSystem", _drop(["labelSystem"]), "labelSystem"),
    ("labelSystem number", _set(["labelSystem"], 3), "labelSystem"),
    ("no elements", _drop(["elements"]), "elements"),
    ("elements string", _set(["elements"], "code"), "elements"),
    ("elements empty", _set(["elements"], []), "elements"),
    ("element bad path", _set(["elements", 0], "code..coding"), r"elements\[0\]"),
    ("element number", _set(["elements", 1], 7), r"elements\[1\]"),
    ("no resourceTypes", _drop(["resourceTypes"]), "resourceTypes"),
    ("resourceTypes object", _set(["resourceTypes"], {"Observation": True}), "resourceTypes"),
    ("no confidentiality", _drop(["confidentiality"]), "confidentiality"),
    ("confidentiality list", _set(["confidentiality"], ["R"]), "confidentiality"),
    ("confidentiality no code", _drop(["confidentiality", "code"]), "code"),
    ("no rules", _drop(["rules"]), "rules"),
    ("rules empty", _set(["rules"], []), "rules"),
    ("rule not object", _set(["rules", 0], "HIV"), r"rules\[0\]"),
    ("rule no label", _drop(["rules", 0, "label"]), "label"),
    ("label no code", _drop(["rules", 1, "label", "code"]), r"rules\[1\]\.label"),
    ("label other system", _set(["rules", 0, "label", "system"], "urn:x"), "labelSystem"),
    ("duplicate label", _set(["rules", 1, "label", "code"], "HIV"), "more than one rule"),
    ("rule no codes", _drop(["rules", 0, "codes"]), "codes"),
    ("codes not list", _set(["rules", 0, "codes"], {"system": LOINC}), "codes"),
    ("code no system", _drop(["rules", 0, "codes", 0, "system"]), r"codes\[0\]"),
    ("code number", _set(["rules", 0, "codes", 1, "code"], 75622), r"codes\[1\]\.code"),
    ("rule no prefixes", _drop(["rules", 2, "prefixes"]), "prefixes"),
    ("prefix entry no list", _drop(["rules", 2, "prefixes", 0, "prefixes"]), "prefixes"),
    ("prefix list string", _set(["rules", 2, "prefixes", 0, "prefixes"], "F3"), "prefixes"),
    ("prefix empty", _set(["rules", 2, "prefixes", 0, "prefixes", 0], ""), r"prefixes\[0\]"),
    ("prefix only dot", _set(["rules", 2, "prefixes", 0, "prefixes", 0], "."), "empty once the dot"),
    ("prefix number", _set(["rules", 2, "prefixes", 0, "prefixes", 0], 3), r"prefixes\[0\]"),
]


@pytest.mark.parametrize(("case", "mutate", "message"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_rules_raise(tmp_path: Path, case: str, mutate: Any, message: str) -> None:
    data = rules()
    mutate(data)
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        SecurityLabeler.load(path)


@pytest.mark.parametrize("text", ["", "{", "[]", '"rules"', "null"])
def test_not_a_rules_document(tmp_path: Path, text: str) -> None:
    path = tmp_path / "rules.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="security label rules"):
        SecurityLabeler.load(path)


def test_real_rules_file_still_loads_after_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(rules()))
    assert SecurityLabeler.load(path).label_universe == {"HIV", "PSY", "SUD"}

"""ProfileValidator: structure (R4B) plus the profiles of fhir/, driven by the JSON."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.fhir_validation import IGError, Issue, ProfileValidator

REPO = Path(__file__).resolve().parents[2]
IG_DIR = REPO / "fhir"
BASE = "https://mhr.example.org/fhir"
LOINC = "http://loinc.org"
CANARY = "CANARY-7f3e9a"
EXAMPLES = sorted((IG_DIR / "examples").glob("*.json"))

JSON = dict[str, Any]


@pytest.fixture(scope="module")
def validator() -> ProfileValidator:
    return ProfileValidator.load(IG_DIR)


def _example(name: str) -> JSON:
    data: JSON = orjson.loads((IG_DIR / "examples" / f"{name}.json").read_bytes())
    return data


def _entry_index(bundle: JSON, predicate: Callable[[JSON], bool]) -> int:
    return next(i for i, e in enumerate(bundle["entry"]) if predicate(e["resource"]))


def _has_code(code: str) -> Callable[[JSON], bool]:
    def predicate(resource: JSON) -> bool:
        codings = resource.get("code", {}).get("coding", [])
        return any(c.get("code") == code for c in codings)

    return predicate


def _errors(issues: list[Issue]) -> list[Issue]:
    return [i for i in issues if i.severity == "error"]


def _assert_no_canary(issues: list[Issue]) -> None:
    for issue in issues:
        assert CANARY not in issue.diagnostics
        assert CANARY not in issue.expression


def _patient() -> JSON:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "http://hl7.org/fhir/sid/passport-KEN", "value": "AK0000001"}],
        "name": [{"family": "Otieno", "given": ["Achieng"]}],
        "birthDate": "1990-02-03",
    }


def _igra(value_code: str = "LA6577-6") -> JSON:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "71773-6"}]},
        "subject": {"reference": "Patient/1"},
        "effectiveDateTime": "2025-01-02",
        "valueCodeableConcept": {"coding": [{"system": LOINC, "code": value_code}]},
    }


# --------------------------------------------------------------------------- examples


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_without_issues(validator: ProfileValidator, path: Path) -> None:
    bundle = orjson.loads(path.read_bytes())
    assert validator.validate_bundle(bundle) == []
    assert validator.validate(bundle) == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_covered_by_profiles(validator: ProfileValidator, path: Path) -> None:
    bundle = orjson.loads(path.read_bytes())
    assert validator.applicable_profiles(bundle) == [f"{BASE}/StructureDefinition/mhr-exam-bundle"]
    vital_signs = {"29463-7", "8302-2"}
    for entry in bundle["entry"]:
        resource = entry["resource"]
        rtype = resource["resourceType"]
        if rtype in {"Patient", "Encounter"} or (
            rtype == "Observation" and resource["code"]["coding"][0]["code"] not in vital_signs
        ):
            assert len(validator.applicable_profiles(resource)) == 1, resource["code"]


def test_profile_selection_by_code(validator: ProfileValidator) -> None:
    b1 = _example("exam-adult-b1-pulmonary")
    chosen = {
        validator.applicable_profiles(e["resource"])[0].rsplit("/", 1)[1]
        for e in b1["entry"]
        if e["resource"]["resourceType"] == "Observation" and validator.applicable_profiles(e["resource"])
    }
    assert chosen == {
        "mhr-igra",
        "mhr-chest-xray",
        "mhr-sputum-smear",
        "mhr-sputum-culture",
        "mhr-mtbc-naat",
        "mhr-serology",
        "mhr-classification-observation",
    }


# --------------------------------------------------------------------------- negative cases


def test_coding_without_system(validator: ProfileValidator) -> None:
    bundle = _example("exam-adult-normal")
    i = _entry_index(bundle, _has_code("71773-6"))
    del bundle["entry"][i]["resource"]["category"][0]["coding"][0]["system"]
    bundle["entry"][i]["resource"]["category"][0]["coding"][0]["code"] = CANARY
    issues = validator.validate_bundle(bundle)
    assert [(x.code, x.expression) for x in issues] == [
        ("required", f"Bundle.entry[{i}].resource.category[0].coding[0].system")
    ]
    _assert_no_canary(issues)


def test_coding_without_system_outside_coding_arrays(validator: ProfileValidator) -> None:
    encounter = _example("exam-adult-normal")["entry"][1]["resource"]
    encounter["class"] = {"code": "AMB"}
    issues = validator.validate(encounter)
    assert ("required", "Encounter.class.system") in [(x.code, x.expression) for x in issues]


def test_igra_value_outside_value_set(validator: ProfileValidator) -> None:
    bundle = _example("exam-child-igra-b2")
    i = _entry_index(bundle, _has_code("71773-6"))
    bundle["entry"][i]["resource"]["valueCodeableConcept"] = {
        "coding": [{"system": LOINC, "code": CANARY, "display": CANARY}],
        "text": CANARY,
    }
    issues = validator.validate_bundle(bundle)
    assert [(x.code, x.expression) for x in issues] == [
        ("code-invalid", f"Bundle.entry[{i}].resource.valueCodeableConcept.coding[0].code")
    ]
    assert "igra-result" in issues[0].diagnostics
    _assert_no_canary(issues)


def test_igra_value_of_wrong_choice_type(validator: ProfileValidator) -> None:
    igra = _igra()
    del igra["valueCodeableConcept"]
    igra["valueString"] = CANARY
    issues = validator.validate(igra)
    assert [(x.code, x.expression) for x in issues] == [("structure", "Observation.valueString")]
    _assert_no_canary(issues)


def test_igra_value_missing(validator: ProfileValidator) -> None:
    igra = _igra()
    del igra["valueCodeableConcept"]
    issues = validator.validate(igra)
    assert [(x.code, x.expression) for x in issues] == [("required", "Observation.value[x]")]


def test_patient_without_identifier(validator: ProfileValidator) -> None:
    patient = _patient()
    del patient["identifier"]
    issues = validator.validate(patient)
    assert [(x.code, x.expression) for x in issues] == [("required", "Patient.identifier")]


def test_patient_identifier_without_system_in_bundle(validator: ProfileValidator) -> None:
    bundle = _example("exam-refugee-vaccinations")
    identifiers = bundle["entry"][0]["resource"]["identifier"]
    del identifiers[1]["system"]
    identifiers[1]["value"] = CANARY
    issues = validator.validate_bundle(bundle)
    assert [(x.code, x.expression) for x in issues] == [
        ("required", "Bundle.entry[0].resource.identifier[1].system")
    ]
    _assert_no_canary(issues)


def test_batch_bundle_is_refused(validator: ProfileValidator) -> None:
    bundle = _example("exam-adult-normal")
    bundle["type"] = "batch"
    issues = validator.validate_bundle(bundle)
    assert [(x.code, x.expression) for x in issues] == [("value", "Bundle.type")]


def test_empty_bundle(validator: ProfileValidator) -> None:
    issues = validator.validate_bundle({"resourceType": "Bundle", "type": "transaction"})
    assert [(x.code, x.expression) for x in issues] == [("required", "Bundle.entry")]


def test_unknown_element(validator: ProfileValidator) -> None:
    patient = _patient()
    patient["favouriteColour"] = CANARY
    issues = validator.validate(patient)
    assert [(x.code, x.expression) for x in issues] == [("structure", "Patient.favouriteColour")]
    _assert_no_canary(issues)


def test_wrong_type(validator: ProfileValidator) -> None:
    patient = _patient()
    patient["name"] = CANARY
    issues = validator.validate(patient)
    assert [(x.code, x.expression) for x in issues] == [("structure", "Patient.name")]
    _assert_no_canary(issues)


def test_invalid_primitive_value(validator: ProfileValidator) -> None:
    patient = _patient()
    patient["birthDate"] = CANARY
    issues = validator.validate(patient)
    assert [(x.code, x.expression) for x in issues] == [("value", "Patient.birthDate")]
    _assert_no_canary(issues)


def test_missing_required_core_element(validator: ProfileValidator) -> None:
    igra = _igra()
    del igra["status"]
    issues = validator.validate(igra)
    assert [(x.code, x.expression) for x in issues] == [("required", "Observation.status")]


def test_structural_errors_inside_a_bundle(validator: ProfileValidator) -> None:
    bundle = _example("exam-adult-b1-pulmonary")
    i = _entry_index(bundle, _has_code("11477-7"))
    bundle["entry"][i]["resource"]["bogus"] = CANARY
    bundle["entry"][i]["resource"]["effectiveDateTime"] = CANARY
    issues = validator.validate_bundle(bundle)
    assert sorted((x.code, x.expression) for x in issues) == [
        ("structure", f"Bundle.entry[{i}].resource.bogus"),
        ("value", f"Bundle.entry[{i}].resource.effectiveDateTime"),
    ]
    _assert_no_canary(issues)


def test_unknown_resource_type_in_bundle(validator: ProfileValidator) -> None:
    bundle = _example("exam-adult-normal")
    bundle["entry"][3]["resource"] = {"resourceType": CANARY}
    issues = validator.validate_bundle(bundle)
    assert [(x.code, x.expression) for x in issues] == [
        ("structure", "Bundle.entry[3].resource.resourceType")
    ]
    _assert_no_canary(issues)


def test_not_a_resource(validator: ProfileValidator) -> None:
    assert [i.code for i in validator.validate([CANARY])] == ["structure"]
    assert [i.expression for i in validator.validate({"resourceType": "Coding"})] == ["Coding.resourceType"]
    assert [i.expression for i in validator.validate_bundle(_patient())] == ["Bundle"]


def test_two_choice_variants(validator: ProfileValidator) -> None:
    igra = _igra()
    igra["valueString"] = CANARY
    issues = _errors(validator.validate(igra))
    assert issues and issues[0].code == "structure"
    _assert_no_canary(issues)


def test_claimed_profile_is_checked(validator: ProfileValidator) -> None:
    smear = _igra("260385009")
    smear["code"]["coding"][0]["code"] = "11477-7"
    smear["valueCodeableConcept"]["coding"][0]["system"] = "http://snomed.info/sct"
    smear["specimen"] = {"display": "Sputum 1"}
    assert validator.validate(smear) == []
    smear["meta"] = {"profile": [f"{BASE}/StructureDefinition/mhr-igra|0.1.0"]}
    issues = validator.validate(smear)
    assert [(x.code, x.expression) for x in issues] == [
        ("value", "Observation.code"),
        ("code-invalid", "Observation.valueCodeableConcept.coding[0].code"),
    ]


def test_claimed_profile_of_other_type_and_unknown_profile(validator: ProfileValidator) -> None:
    patient = _patient()
    patient["meta"] = {"profile": [f"{BASE}/StructureDefinition/mhr-igra", "http://example.org/other"]}
    issues = validator.validate(patient)
    assert [(x.severity, x.code, x.expression) for x in issues] == [
        ("error", "structure", "Patient.meta.profile[0]"),
        ("warning", "not-supported", "Patient.meta.profile[1]"),
    ]


def test_cxr_finding_must_come_from_the_code_system(validator: ProfileValidator) -> None:
    bundle = _example("exam-adult-b1-pulmonary")
    i = _entry_index(bundle, _has_code("36643-5"))
    finding = bundle["entry"][i]["resource"]["component"][1]["valueCodeableConcept"]
    finding["coding"][0]["code"] = CANARY
    issues = validator.validate_bundle(bundle)
    assert [(x.code, x.expression) for x in issues] == [
        (
            "code-invalid",
            f"Bundle.entry[{i}].resource.component[1].valueCodeableConcept.coding[0].code",
        )
    ]
    _assert_no_canary(issues)


def test_tb_class_component(validator: ProfileValidator) -> None:
    bundle = _example("exam-child-igra-b2")
    i = _entry_index(bundle, _has_code("exam-classification"))
    components = bundle["entry"][i]["resource"]["component"]
    components.append(copy.deepcopy(components[0]))
    issues = validator.validate_bundle(bundle)
    assert [(x.code, x.expression) for x in issues] == [
        ("structure", f"Bundle.entry[{i}].resource.component")
    ]


def test_serology_code_selects_profile(validator: ProfileValidator) -> None:
    rpr = _igra()
    rpr["code"]["coding"][0]["code"] = "20507-0"
    del rpr["valueCodeableConcept"]
    issues = validator.validate(rpr)
    assert [(x.code, x.expression) for x in issues] == [("required", "Observation.value[x]")]


# --------------------------------------------------------------------------- profile-driven


@pytest.fixture
def ig_copy(tmp_path: Path) -> Path:
    target = tmp_path / "fhir"
    shutil.copytree(IG_DIR, target)
    return target


def _edit(path: Path, change: Callable[[JSON], None]) -> None:
    data = orjson.loads(path.read_bytes())
    change(data)
    path.write_bytes(orjson.dumps(data))


def test_value_set_change_changes_results(ig_copy: Path) -> None:
    def drop_negative(vs: JSON) -> None:
        concepts = vs["compose"]["include"][0]["concept"]
        vs["compose"]["include"][0]["concept"] = [c for c in concepts if c["code"] != "LA6577-6"]

    _edit(ig_copy / "ValueSet-igra-result.json", drop_negative)
    validator = ProfileValidator.load(ig_copy, warm_up=False)
    bundle = _example("exam-adult-normal")
    i = _entry_index(bundle, _has_code("71773-6"))
    assert [(x.code, x.expression) for x in validator.validate_bundle(bundle)] == [
        ("code-invalid", f"Bundle.entry[{i}].resource.valueCodeableConcept.coding[0].code")
    ]


def test_cardinality_change_changes_results(ig_copy: Path) -> None:
    def require_telecom(sd: JSON) -> None:
        sd["differential"]["element"].append({"id": "Patient.telecom", "path": "Patient.telecom", "min": 1})

    _edit(ig_copy / "StructureDefinition-mhr-patient.json", require_telecom)
    validator = ProfileValidator.load(ig_copy, warm_up=False)
    for path in EXAMPLES:
        issues = validator.validate_bundle(orjson.loads(path.read_bytes()))
        assert [(x.code, x.expression) for x in issues] == [("required", "Bundle.entry[0].resource.telecom")]


def test_pattern_change_changes_results(ig_copy: Path) -> None:
    def inpatient(sd: JSON) -> None:
        for element in sd["differential"]["element"]:
            if element["path"] == "Encounter.class":
                element["patternCoding"]["code"] = "IMP"

    _edit(ig_copy / "StructureDefinition-mhr-exam-encounter.json", inpatient)
    validator = ProfileValidator.load(ig_copy, warm_up=False)
    issues = validator.validate_bundle(_example("exam-adult-normal"))
    assert [(x.code, x.expression) for x in issues] == [("value", "Bundle.entry[1].resource.class")]


def test_fixed_value_change_changes_results(ig_copy: Path) -> None:
    def batch(sd: JSON) -> None:
        for element in sd["differential"]["element"]:
            if element["path"] == "Bundle.type":
                element["fixedCode"] = "batch"

    _edit(ig_copy / "StructureDefinition-mhr-exam-bundle.json", batch)
    validator = ProfileValidator.load(ig_copy, warm_up=False)
    bundle = _example("exam-adult-normal")
    assert [(x.code, x.expression) for x in validator.validate_bundle(bundle)] == [("value", "Bundle.type")]
    bundle["type"] = "batch"
    assert validator.validate_bundle(bundle) == []


def test_auto_apply_selector_comes_from_the_profile(ig_copy: Path) -> None:
    igra = _igra(CANARY)
    assert [x.code for x in ProfileValidator.load(IG_DIR, warm_up=False).validate(igra)] == ["code-invalid"]

    def manual_only(sd: JSON) -> None:
        del sd["extension"]

    _edit(ig_copy / "StructureDefinition-mhr-igra.json", manual_only)
    validator = ProfileValidator.load(ig_copy, warm_up=False)
    assert validator.validate(igra) == []
    igra["meta"] = {"profile": [f"{BASE}/StructureDefinition/mhr-igra"]}
    assert [x.code for x in validator.validate(igra)] == ["code-invalid"]


def test_new_profile_is_picked_up(ig_copy: Path) -> None:
    sd = orjson.loads((ig_copy / "StructureDefinition-mhr-igra.json").read_bytes())
    sd["id"] = "mhr-weight"
    sd["url"] = f"{BASE}/StructureDefinition/mhr-weight"
    sd["differential"]["element"] = [
        {"id": "Observation", "path": "Observation"},
        {
            "id": "Observation.code",
            "path": "Observation.code",
            "patternCodeableConcept": {"coding": [{"system": LOINC, "code": "29463-7"}]},
        },
        {"id": "Observation.note", "path": "Observation.note", "min": 1},
    ]
    (ig_copy / "StructureDefinition-mhr-weight.json").write_bytes(orjson.dumps(sd))
    validator = ProfileValidator.load(ig_copy, warm_up=False)
    bundle = _example("exam-adult-normal")
    i = _entry_index(bundle, _has_code("29463-7"))
    assert [(x.code, x.expression) for x in validator.validate_bundle(bundle)] == [
        ("required", f"Bundle.entry[{i}].resource.note")
    ]


def test_unsupported_profile_features_fail_at_load(ig_copy: Path) -> None:
    def slice_it(sd: JSON) -> None:
        sd["differential"]["element"].append(
            {"id": "Patient.identifier:passport", "path": "Patient.identifier", "sliceName": "x"}
        )

    _edit(ig_copy / "StructureDefinition-mhr-patient.json", slice_it)
    with pytest.raises(IGError, match="sliceName"):
        ProfileValidator.load(ig_copy)


def test_binding_to_unknown_value_set_fails_at_load(ig_copy: Path) -> None:
    def unknown(sd: JSON) -> None:
        for element in sd["differential"]["element"]:
            if "binding" in element:
                element["binding"]["valueSet"] = f"{BASE}/ValueSet/nope"

    _edit(ig_copy / "StructureDefinition-mhr-igra.json", unknown)
    with pytest.raises(IGError, match="nope"):
        ProfileValidator.load(ig_copy)


def test_issues_are_hashable_values() -> None:
    issue = Issue("error", "required", "Patient.identifier", "x")
    assert issue == Issue("error", "required", "Patient.identifier", "x")
    assert len({issue, Issue("error", "required", "Patient.identifier", "x")}) == 1

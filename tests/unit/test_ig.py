"""The implementation guide in fhir/: every file is valid R4B, consistent and self-contained."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from fhir.resources.R4B import get_fhir_model_class

from service.fhir_validation import IGError, ImplementationGuide

REPO = Path(__file__).resolve().parents[2]
IG_DIR = REPO / "fhir"
BASE = "https://mhr.example.org/fhir"
V3_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"

ALL_JSON = sorted(IG_DIR.rglob("*.json"))
RESOURCE_FILES = ALL_JSON
EXAMPLES = sorted((IG_DIR / "examples").glob("*.json"))


def _load(path: Path) -> Any:
    return orjson.loads(path.read_bytes())


def _rel(path: Path) -> str:
    return str(path.relative_to(IG_DIR))


@pytest.fixture(scope="module")
def ig() -> ImplementationGuide:
    return ImplementationGuide.load(IG_DIR)


def test_service_package_is_this_repository() -> None:
    import service

    assert Path(service.__file__).resolve().is_relative_to(REPO)


def test_fhir_folder_holds_no_python() -> None:
    assert not [p for p in IG_DIR.rglob("*") if p.suffix in {".py", ".pyc"}]


@pytest.mark.parametrize("path", RESOURCE_FILES, ids=_rel)
def test_every_resource_parses_with_r4b(path: Path) -> None:
    data = _load(path)
    get_fhir_model_class(data["resourceType"]).model_validate(data)


@pytest.mark.parametrize("path", [p for p in RESOURCE_FILES if p.parent == IG_DIR], ids=_rel)
def test_file_named_after_type_and_id(path: Path) -> None:
    data = _load(path)
    assert path.name == f"{data['resourceType']}-{data['id']}.json"
    if "url" in data:
        assert data["url"] == f"{BASE}/{data['resourceType']}/{data['id']}"


def test_expected_artifacts_present(ig: ImplementationGuide) -> None:
    for cs in ("exam-type", "tb-classification", "overall-classification", "cxr-finding"):
        ig.resource(f"{BASE}/CodeSystem/{cs}", "CodeSystem")
        assert ig.expand(f"{BASE}/ValueSet/{cs}")
    for sd in (
        "mhr-patient",
        "mhr-exam-encounter",
        "mhr-classification-observation",
        "mhr-igra",
        "mhr-chest-xray",
        "mhr-sputum-smear",
        "mhr-sputum-culture",
        "mhr-mtbc-naat",
        "mhr-serology",
        "mhr-exam-bundle",
    ):
        definition = ig.resource(f"{BASE}/StructureDefinition/{sd}", "StructureDefinition")
        assert definition["derivation"] == "constraint"
        assert definition["differential"]["element"]
    sids = {u["value"] for ns in ig.resources("NamingSystem") for u in ns["uniqueId"]}
    assert {
        f"{BASE}/sid/case-number",
        f"{BASE}/sid/a-number",
        f"{BASE}/sid/unhcr-progres-id",
        f"{BASE}/sid/iom-case-number",
        f"{BASE}/sid/organization",
    } <= sids


def test_tb_classes_and_cxr_findings(ig: ImplementationGuide) -> None:
    tb = {code for _, code in ig.expand(f"{BASE}/ValueSet/tb-classification")}
    assert tb == {"A", "B0", "B1-pulmonary", "B1-extrapulmonary", "B2", "B3", "none"}
    overall = {code for _, code in ig.expand(f"{BASE}/ValueSet/overall-classification")}
    assert overall == {"no-class", "class-a", "class-b", "class-b-other"}
    cxr = {code for _, code in ig.expand(f"{BASE}/ValueSet/cxr-finding")}
    assert {"normal", "cavitary-lesion", "infiltrate-consolidation", "miliary-findings"} <= cxr


def test_code_system_counts(ig: ImplementationGuide) -> None:
    for cs in ig.resources("CodeSystem"):
        assert cs["count"] == len(ig.code_system_codes(cs["url"]))


def test_binding_value_sets(ig: ImplementationGuide) -> None:
    loinc = "http://loinc.org"
    assert ig.expand(f"{BASE}/ValueSet/igra-result") == {
        (loinc, "LA6576-8"),
        (loinc, "LA6577-6"),
        (loinc, "LA11884-6"),
    }
    assert {c for _, c in ig.expand(f"{BASE}/ValueSet/serology-test")} == {
        "20507-0",
        "24110-9",
        "75622-1",
        "5196-1",
    }


def test_every_coding_in_the_guide_has_a_system() -> None:
    missing: list[str] = []

    def walk(node: Any, where: str, coding: bool) -> None:
        if isinstance(node, dict):
            if coding and "system" not in node:
                missing.append(where)
            for key, value in node.items():
                if isinstance(value, list):
                    for i, item in enumerate(value):
                        walk(item, f"{where}.{key}[{i}]", key == "coding")
                else:
                    walk(value, f"{where}.{key}", key in {"patternCoding", "class"})

    for path in RESOURCE_FILES:
        walk(_load(path), _rel(path), False)
    assert missing == []


def test_capability_statement() -> None:
    cap = _load(IG_DIR / "CapabilityStatement-mhr.json")
    assert cap["status"] == "active"
    assert cap["kind"] == "instance"
    assert cap["fhirVersion"] == "4.0.1"
    assert cap["format"] == ["application/fhir+json"]
    rest = cap["rest"][0]
    assert rest["mode"] == "server"
    service_codings = [c for s in rest["security"]["service"] for c in s["coding"]]
    assert {
        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
        "code": "SMART-on-FHIR",
        "display": "SMART-on-FHIR",
    } in service_codings
    (oauth,) = rest["security"]["extension"]
    assert oauth["url"] == "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
    assert {"url": "token", "valueUri": "{base}/auth/token"} in oauth["extension"]
    assert rest["interaction"][0]["code"] == "transaction"
    by_type = {r["type"]: r for r in rest["resource"]}
    assert set(by_type) >= {
        "Organization",
        "Patient",
        "Encounter",
        "Observation",
        "DiagnosticReport",
        "ImagingStudy",
        "Condition",
        "Immunization",
        "MedicationAdministration",
        "DocumentReference",
        "Consent",
        "Provenance",
        "AuditEvent",
    }
    assert [i["code"] for i in by_type["AuditEvent"]["interaction"]] == ["read", "search-type"]
    # Per-type search parameters: test_capability_statement_lists_the_search_parameters_...
    assert {p["name"] for p in rest["searchParam"]} == {
        "_count",
        "_sort",
        "_offset",
        "_cursor",
        "_total",
        "_summary",
        "_elements",
        "_totalMethod",
    }


def test_capability_statement_profiles_exist(ig: ImplementationGuide) -> None:
    cap = _load(IG_DIR / "CapabilityStatement-mhr.json")
    for resource in cap["rest"][0]["resource"]:
        for url in resource.get("supportedProfile", []):
            assert ig.resource(url, "StructureDefinition")["type"] == resource["type"]


def test_every_file_in_the_guide_is_a_fhir_resource() -> None:
    # FHIR tools (validators, IG tooling) load every JSON file of the folder as a resource.
    assert [_rel(p) for p in ALL_JSON if "resourceType" not in _load(p)] == []


def test_sensitivity_value_sets(ig: ImplementationGuide) -> None:
    """The labelling rules are ValueSets whose useContext (focus) names the v3-ActCode label."""
    labels = {}
    for value_set in ig.resources("ValueSet"):
        if value_set["id"].startswith("mhr-sensitive-"):
            [context] = value_set["useContext"]
            [coding] = context["valueCodeableConcept"]["coding"]
            assert coding["system"] == V3_ACT_CODE
            labels[value_set["id"]] = coding["code"]
            assert ig.expand(value_set["url"])
    assert labels == {
        "mhr-sensitive-hiv": "HIV",
        "mhr-sensitive-sti": "STD",
        "mhr-sensitive-mental-health": "PSY",
        "mhr-sensitive-substance-use": "SUD",
    }
    hiv = ig.expand(f"{BASE}/ValueSet/mhr-sensitive-hiv")
    assert ("http://loinc.org", "75622-1") in hiv


@pytest.mark.parametrize("path", EXAMPLES, ids=_rel)
def test_example_is_a_self_contained_transaction(path: Path) -> None:
    bundle = _load(path)
    assert bundle["type"] == "transaction"
    full_urls = {e["fullUrl"] for e in bundle["entry"]}
    assert all(re.fullmatch(r"urn:uuid:[0-9a-f-]{36}", u) for u in full_urls)
    assert len(full_urls) == len(bundle["entry"])
    for entry in bundle["entry"]:
        assert entry["request"]["method"] == "POST"
        assert entry["request"]["url"] == entry["resource"]["resourceType"]

    references: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("reference"), str):
                references.append(node["reference"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(bundle)
    assert references
    assert set(references) <= full_urls

    (patient_entry,) = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"]
    passport = next(
        i
        for i in patient_entry["resource"]["identifier"]
        if i.get("type", {}).get("coding", [{}])[0].get("code") == "PPN"
    )
    assert re.fullmatch(r"http://hl7\.org/fhir/sid/passport-[A-Z]{3}", passport["system"])
    assert patient_entry["request"]["ifNoneExist"] == (f"identifier={passport['system']}|{passport['value']}")


def test_example_identifier_systems_are_declared(ig: ImplementationGuide) -> None:
    declared = {u["value"] for ns in ig.resources("NamingSystem") for u in ns["uniqueId"]}
    used: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            system = node.get("system")
            if isinstance(system, str) and system.startswith(f"{BASE}/sid/"):
                used.add(system)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for path in EXAMPLES:
        walk(_load(path))
    assert used
    assert used <= declared


def test_examples_use_different_scripts() -> None:
    scripts = set()
    for path in EXAMPLES:
        bundle = _load(path)
        patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
        official = next(n for n in patient["name"] if n["use"] == "official")
        usual = next(n for n in patient["name"] if n["use"] == "usual")
        assert usual["text"].isascii()
        assert not official["text"].isascii()
        lang = official["extension"][0]["valueCode"]
        assert usual["extension"][0]["valueCode"] == f"{lang}-Latn"
        scripts.add(lang)
    assert len(scripts) == len(EXAMPLES) == 4


def test_refugee_example_consent_and_document() -> None:
    bundle = _load(IG_DIR / "examples" / "exam-refugee-vaccinations.json")
    by_type: dict[str, list[dict[str, Any]]] = {}
    for entry in bundle["entry"]:
        by_type.setdefault(entry["resource"]["resourceType"], []).append(entry["resource"])
    assert {i["vaccineCode"]["coding"][0]["code"] for i in by_type["Immunization"]} == {
        "03",
        "09",
        "10",
    }
    assert all(
        i["vaccineCode"]["coding"][0]["system"] == "http://hl7.org/fhir/sid/cvx"
        for i in by_type["Immunization"]
    )
    (consent,) = by_type["Consent"]
    assert consent["scope"]["coding"][0]["code"] == "patient-privacy"
    assert consent["category"][0]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "59284-0",
        "display": "Patient Consent",
    }
    provision = consent["provision"]
    assert provision["type"] == "permit"
    assert provision["period"]["start"]
    assert provision["actor"][0]["reference"]["identifier"] == {
        "system": f"{BASE}/sid/organization",
        "value": "authority-a",
    }
    assert provision["purpose"][0]["code"] == "PUBHLTH"
    (document,) = by_type["DocumentReference"]
    assert document["type"]["coding"][0]["code"] == "64292-6"
    assert document["content"][0]["attachment"]["contentType"] == "application/pdf"
    patient = by_type["Patient"][0]
    assert any(i["system"] == f"{BASE}/sid/unhcr-progres-id" for i in patient["identifier"])


def test_value_set_errors(tmp_path: Path) -> None:
    (tmp_path / "ValueSet-filtered.json").write_bytes(
        orjson.dumps(
            {
                "resourceType": "ValueSet",
                "id": "filtered",
                "url": f"{BASE}/ValueSet/filtered",
                "status": "active",
                "compose": {
                    "include": [
                        {
                            "system": "http://snomed.info/sct",
                            "filter": [{"property": "concept", "op": "is-a", "value": "1"}],
                        }
                    ]
                },
            }
        )
    )
    with pytest.raises(IGError, match="terminology server"):
        ImplementationGuide.load(tmp_path)


def test_unknown_canonical_is_an_error(ig: ImplementationGuide) -> None:
    with pytest.raises(IGError):
        ig.expand(f"{BASE}/ValueSet/does-not-exist")


def test_capability_statement_lists_the_search_parameters_the_server_implements() -> None:
    from service.records.search_params import SEARCH_PARAMETERS

    statement = orjson.loads((IG_DIR / "CapabilityStatement-mhr.json").read_bytes())
    declared = {
        r["type"]: {p["name"] for p in r.get("searchParam", [])} for r in statement["rest"][0]["resource"]
    }
    for resource_type, implemented in SEARCH_PARAMETERS.items():
        assert declared[resource_type] == set(implemented), resource_type

"""What fhir/ derives from the official R4 definitions is current, and standard tools can load it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from service.fhir_validation import ProfileValidator
from service.fhir_validation.build import outputs
from service.fhir_validation.core import DEFINITIONS_DIR
from service.fhir_validation.core_bindings import DATA_FILE, CoreBindings
from service.fhir_validation.snapshot import SnapshotError, generate

REPO = Path(__file__).resolve().parents[2]
IG_DIR = REPO / "fhir"
DEFINITIONS = REPO / DEFINITIONS_DIR
needs_definitions = pytest.mark.skipif(
    not (DEFINITIONS / "version.info").is_file() or shutil.which("node") is None,
    reason="the R4 definitions are installed by `make ig-tools` (make test and make lint do it)",
)
STRUCTURES = sorted(IG_DIR.glob("StructureDefinition-*.json"))


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


@needs_definitions
def test_derived_files_are_current() -> None:
    stale = [
        str(path.relative_to(REPO))
        for path, text in outputs(IG_DIR, DEFINITIONS).items()
        if path.read_text(encoding="utf-8") != text
    ]
    assert stale == [], "run `make ig`"


@needs_definitions
def test_the_guide_loads_and_validates_in_an_independent_validator() -> None:
    done = subprocess.run(
        ["node", str(REPO / "tools/ig/validate.mjs"), str(IG_DIR)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_one_fhir_version_everywhere() -> None:
    versions = {
        str(path.relative_to(IG_DIR)): data["fhirVersion"]
        for path in IG_DIR.rglob("*.json")
        if "fhirVersion" in (data := _load(path))
    }
    assert versions and set(versions.values()) == {"4.0.1"}, versions
    assert CoreBindings.load().version == "4.0.1"
    readme = (REPO / "README.md").read_text()
    assert "FHIR R4B" not in readme
    assert "The wire version is **FHIR R4, 4.0.1**" in readme


@pytest.mark.parametrize("path", STRUCTURES, ids=lambda p: p.stem)
def test_every_structure_definition_ships_a_snapshot_covering_its_differential(path: Path) -> None:
    definition = _load(path)
    snapshot = {e["path"]: e for e in definition["snapshot"]["element"]}
    assert next(iter(snapshot)) == definition["type"]
    for constraint in definition["differential"]["element"]:
        element = snapshot[constraint["path"]]
        assert element["id"] == constraint["id"]
        assert {k: element[k] for k in constraint} == constraint


def test_snapshot_unrolls_a_datatype_and_refuses_an_unknown_path() -> None:
    base = [
        {"id": "Patient", "path": "Patient"},
        {"id": "Patient.identifier", "path": "Patient.identifier", "type": [{"code": "Identifier"}]},
    ]
    identifier = [
        {"id": "Identifier", "path": "Identifier"},
        {"id": "Identifier.system", "path": "Identifier.system", "min": 0},
    ]
    elements = generate(
        base,
        [{"id": "Patient.identifier.system", "path": "Patient.identifier.system", "min": 1}],
        lambda _: identifier,
    )
    assert [(e["path"], e.get("min")) for e in elements] == [
        ("Patient", None),
        ("Patient.identifier", None),
        ("Patient.identifier.system", 1),
    ]
    with pytest.raises(SnapshotError):
        generate(base, [{"id": "Patient.nickname", "path": "Patient.nickname"}], lambda _: identifier)


# --------------------------------------------------------------------------- base required bindings


@pytest.fixture(scope="module")
def validator() -> ProfileValidator:
    return ProfileValidator.load(IG_DIR, warm_up=False)


def test_the_examples_meet_the_base_required_bindings(validator: ProfileValidator) -> None:
    for path in sorted((IG_DIR / "examples").glob("*.json")):
        bundle = _load(path)
        assert validator.core.issues(bundle, "Bundle") == []
        for entry in bundle["entry"]:
            assert validator.core.issues(entry["resource"], "R") == [], path.name


@pytest.mark.parametrize(
    ("resource", "expression"),
    [
        ({"resourceType": "Patient", "gender": "mail"}, "Patient.gender"),
        ({"resourceType": "Patient", "name": [{"use": "usual"}, {"use": "nick"}]}, "Patient.name[1].use"),
        (
            {
                "resourceType": "Patient",
                "contact": [{"telecom": [{"system": "pager", "value": "1"}, {"system": "fax2"}]}],
            },
            "Patient.contact[0].telecom[1].system",
        ),
        (
            {
                "resourceType": "Observation",
                "status": "final",
                "valueQuantity": {"value": 1, "comparator": "=="},
            },
            "Observation.valueQuantity.comparator",
        ),
        (
            {"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {"method": "FETCH"}}]},
            "Bundle.entry[0].request.method",
        ),
        ({"resourceType": "Consent", "status": "signed"}, "Consent.status"),
    ],
    ids=["gender", "name-use", "nested-datatype", "choice-type", "bundle", "consent"],
)
def test_each_violation_is_one_issue_with_its_expression(
    validator: ProfileValidator, resource: dict[str, Any], expression: str
) -> None:
    issues = validator.core.issues(resource, resource["resourceType"])
    assert [(i.code, i.expression, i.basic) for i in issues] == [("code-invalid", expression, True)]
    assert "required binding" in issues[0].diagnostics


def test_extensions_and_unknown_types_are_not_walked(validator: ProfileValidator) -> None:
    resource = {
        "resourceType": "Patient",
        "gender": "other",
        "extension": [{"url": "urn:x", "valueCode": "anything"}],
        "_gender": {"extension": [{"url": "urn:y", "valueCode": "x"}]},
    }
    assert validator.core.issues(resource, "Patient") == []
    assert validator.core.issues({"resourceType": "Spaceship", "status": "x"}, "Spaceship") == []
    assert validator.core.issues(["not", "a", "resource"], "R") == []


def test_the_bindings_data_covers_every_type_the_server_stores() -> None:
    from service.records.resource_types import STORED_TYPES

    data = _load(DATA_FILE)
    assert set(STORED_TYPES) | {"Bundle"} <= set(data["bindings"])
    # Only BCP 13 media types (Attachment.contentType) and ISO 4217 currencies (Money.currency,
    # reachable since Task and QuestionnaireResponse are stored) cannot be listed; both are left
    # to the parser's code type.
    assert list(data["notEnforced"]) == [
        "http://hl7.org/fhir/ValueSet/currencies",
        "http://hl7.org/fhir/ValueSet/mimetypes",
    ]

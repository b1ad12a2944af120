"""Dropping references to withheld resources: the rules, table-driven, without a database."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from service.records.masking import MASKED_REFERENCE, drop_references, parse_target, required_elements

BASE = "https://mhr.example.org/fhir/"
HIDDEN = "Observation/hidden"


def withheld(reference: str) -> bool:
    target = parse_target(reference, BASE)
    return target is not None and target[:2] == ("Observation", "hidden")


CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "list entry dropped, the rest kept",
        {
            "resourceType": "DiagnosticReport",
            "result": [{"reference": "Observation/a"}, {"reference": HIDDEN}],
        },
        {"resourceType": "DiagnosticReport", "result": [{"reference": "Observation/a"}]},
    ),
    (
        "optional single reference dropped with its display",
        {
            "resourceType": "Observation",
            "encounter": {"reference": HIDDEN, "display": "HIV"},
            "status": "final",
        },
        {"resourceType": "Observation", "status": "final"},
    ),
    (
        "emptied optional list goes",
        {"resourceType": "Observation", "derivedFrom": [{"reference": HIDDEN}], "status": "final"},
        {"resourceType": "Observation", "status": "final"},
    ),
    (
        "version-specific and absolute references are references too",
        {
            "resourceType": "Observation",
            "hasMember": [{"reference": f"{HIDDEN}/_history/3"}, {"reference": f"{BASE}{HIDDEN}"}],
            "status": "final",
        },
        {"resourceType": "Observation", "status": "final"},
    ),
    (
        "backbone element that requires the reference goes with it",
        {
            "resourceType": "Encounter",
            "diagnosis": [
                {"condition": {"reference": HIDDEN}, "rank": 1},
                {"condition": {"reference": "Condition/c"}},
            ],
        },
        {"resourceType": "Encounter", "diagnosis": [{"condition": {"reference": "Condition/c"}}]},
    ),
    (
        "extension without its value goes",
        {
            "resourceType": "Observation",
            "extension": [
                {"url": "u", "valueReference": {"reference": HIDDEN}},
                {"url": "v", "valueString": "s"},
            ],
        },
        {"resourceType": "Observation", "extension": [{"url": "v", "valueString": "s"}]},
    ),
    (
        "a modifier extension that goes takes its element",
        {
            "resourceType": "Encounter",
            "participant": [
                {"modifierExtension": [{"url": "m", "valueReference": {"reference": HIDDEN}}], "type": []},
                {"individual": {"reference": "Practitioner/p"}},
            ],
        },
        {"resourceType": "Encounter", "participant": [{"individual": {"reference": "Practitioner/p"}}]},
    ),
    (
        "required element at the root is masked, not dropped",
        {"resourceType": "Provenance", "target": [{"reference": f"{HIDDEN}/_history/1"}], "recorded": "2026"},
        {"resourceType": "Provenance", "target": [MASKED_REFERENCE], "recorded": "2026"},
    ),
    (
        "contained resources are checked by their own type",
        {
            "resourceType": "DiagnosticReport",
            "contained": [{"resourceType": "Observation", "id": "x", "hasMember": [{"reference": HIDDEN}]}],
        },
        {"resourceType": "DiagnosticReport", "contained": [{"resourceType": "Observation", "id": "x"}]},
    ),
    (
        "logical, contained and foreign references are left alone",
        {
            "resourceType": "Observation",
            "performer": [
                {"reference": "#x"},
                {"identifier": {"value": "1"}},
                {"reference": "Practitioner/hidden"},
            ],
        },
        {
            "resourceType": "Observation",
            "performer": [
                {"reference": "#x"},
                {"identifier": {"value": "1"}},
                {"reference": "Practitioner/hidden"},
            ],
        },
    ),
]


@pytest.mark.parametrize(("name", "given", "expected"), CASES, ids=[c[0] for c in CASES])
def test_drop_references(name: str, given: dict[str, Any], expected: dict[str, Any]) -> None:
    assert drop_references(copy.deepcopy(given), withheld) == expected


def test_required_elements_come_from_the_base_resources() -> None:
    assert "Provenance.target" in required_elements("Provenance")
    assert "Encounter.diagnosis.condition" in required_elements("Encounter")
    assert "Observation.encounter" not in required_elements("Observation")
    assert required_elements("NotAResource") == frozenset()


def test_parse_target_names_only_stored_types() -> None:
    assert parse_target("Observation/a/_history/2", BASE) == ("Observation", "a", 2)
    assert parse_target(f"{BASE}Patient/p", BASE) == ("Patient", "p", None)
    assert parse_target("Practitioner/p", BASE) is None
    assert parse_target("urn:uuid:1234", BASE) is None

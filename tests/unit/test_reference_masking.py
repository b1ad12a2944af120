"""Dropping references to withheld resources: the rules, table-driven, without a database."""

from __future__ import annotations

import copy
import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.records.masking import (
    MASKED_REFERENCE,
    _references,
    drop_references,
    parse_target,
    references_in,
    required_elements,
)

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


# --- the scan of the stored bytes finds exactly what the walk of the parsed resource finds -----

_TEXT = st.text(alphabet=st.sampled_from('ab/"\\:,{}[] \n\u00e9\u2028\x01reference'), max_size=24)
_KEYS = st.one_of(st.sampled_from(["reference", "display", "extension", "contained", 'a"reference']), _TEXT)
_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), _TEXT),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(_KEYS, children, max_size=4)),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(_JSON)
def test_the_byte_scan_finds_every_reference_the_walk_finds(document: Any) -> None:
    walked = sorted(_references(document))
    assert sorted(references_in(orjson.dumps(document))) == walked
    # Whitespace between tokens (bytes not written by orjson) changes nothing either.
    assert sorted(references_in(json.dumps(document, indent=1).encode())) == walked


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"note":"{\\"reference\\":\\"Observation/x\\"}"}', []),  # text that looks like one
        (b'{"a\\"reference":"Observation/x"}', []),  # a member name ending in it
        (b'{"reference":"Observation/a\\/b"}', ["Observation/a/b"]),  # an escape in the value
        (b'{"\\u0072eference":"Observation/x"}', ["Observation/x"]),  # a spelling with \\u
        (b'{"reference":{"reference":"Observation/y"}}', ["Observation/y"]),
    ],
)
def test_the_byte_scan_reads_json_not_text(body: bytes, expected: list[str]) -> None:
    assert references_in(body) == expected

"""The count of JSON values made on a body's bytes, before parsing, is the parser's count."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.api import json_size
from service.api.fhir_body import BodyLimits, parse_fhir_json
from service.api.json_size import holds_more_values_than, json_value_count
from service.http.errors import FhirError

# Strings full of what the byte count must not mistake for structure.
_text = st.text(alphabet=st.sampled_from(list('a,[]{}"\\ :\n\té\u2028')))
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | _text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=30,
)


def _values(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + sum(_values(v) for v in value.values())
    if isinstance(value, list):
        return 1 + sum(_values(v) for v in value)
    return 1


def _spellings(value: Any) -> list[bytes]:
    """The same value as different writers send it: compact, indented, ASCII-escaped."""
    return [
        json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode(),
        json.dumps(value, indent=2, ensure_ascii=False).encode(),
        json.dumps(value, separators=(" ,  ", " :\t")).encode(),
    ]


@settings(max_examples=600, deadline=None, database=None)
@given(value=_json)
def test_the_byte_count_is_the_value_count(value: Any) -> None:
    for body in _spellings(value):
        assert json_value_count(body) == _values(value), body


@settings(max_examples=300, deadline=None, database=None)
@given(value=_json)
def test_slice_boundaries_change_nothing(value: Any) -> None:
    # Slices of a few bytes cut through escapes, strings and empty containers everywhere.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(json_size, "_SLICE", 3)
        for body in _spellings(value):
            assert json_value_count(body) == _values(value), body


@pytest.mark.parametrize(
    ("body", "count"),
    [
        (b"[]", 1),
        (b"[ ]", 1),
        (b"[[],{}]", 3),
        (b'{"a":[1,2],"b":{}}', 5),
        (b'["\\\\",",[{"]', 3),
        (b'["\\"", "\\\\\\"]"]', 3),
        (b'"[1,2,3]"', 1),
        (b"[" * 50 + b"]" * 50, 50),
    ],
)
def test_known_counts(body: bytes, count: int) -> None:
    assert json_value_count(body) == count == _values(json.loads(body))


def test_the_limit_is_exact_at_its_edge() -> None:
    body = orjson.dumps([0] * 999)  # 1000 values with the array
    assert not holds_more_values_than(body, 1000)
    assert holds_more_values_than(body, 999)
    # Commas inside strings do not count, however many.
    prose = orjson.dumps({"note": ", [x], {y}" * 10_000})
    assert not holds_more_values_than(prose, 10)


def test_a_body_over_the_value_limit_is_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_parsing(_: bytes) -> None:
        raise AssertionError("parsed")

    monkeypatch.setattr(orjson, "loads", no_parsing)
    body = b'{"resourceType":"Observation","extension":[' + b",".join([b'{"url":"x"}'] * 2000) + b"]}"
    with pytest.raises(FhirError) as refused:
        parse_fhir_json(body, BodyLimits(values=1000))
    assert refused.value.status == 413
    assert "more than 1000 JSON values" in refused.value.issues[0].diagnostics


@pytest.mark.parametrize(
    ("value", "limits", "named"),
    [
        ({"resourceType": "Observation", "x": list(range(11))}, BodyLimits(array_items=10), "10 items"),
        ({"resourceType": "Bundle", "entry": [{}] * 6}, BodyLimits(bundle_entries=5), "5 entries"),
        ({"resourceType": "Observation", "x": "y" * 13}, BodyLimits(string_chars=12), "12 characters"),
        ({"a": [[[[1]]]]}, BodyLimits(depth=5), "5 levels"),
    ],
)
def test_each_work_limit_is_named_in_a_413(value: Any, limits: BodyLimits, named: str) -> None:
    with pytest.raises(FhirError) as refused:
        parse_fhir_json(orjson.dumps(value), limits)
    assert refused.value.status == 413
    assert refused.value.issues[0].code == "too-costly"
    assert named in refused.value.issues[0].diagnostics


def test_just_under_each_limit_parses() -> None:
    limits = BodyLimits(values=100, array_items=10, bundle_entries=5, string_chars=12, depth=5)
    for value in (
        {"resourceType": "Observation", "x": list(range(10))},
        {"resourceType": "Bundle", "entry": [{}] * 5},
        {"resourceType": "Observation", "x": "y" * 12},
        {"a": [[[1]]]},  # five levels, the scalar the fifth
        [[0] * 9] * 9 + [[0] * 8],  # 100 values: 1 + 9 * 10 + 9
    ):
        assert _values(value) <= 100
        assert parse_fhir_json(orjson.dumps(value), limits) == value

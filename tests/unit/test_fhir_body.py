"""The request body's shape checks: the fast path answers exactly as the full walk does."""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from service.api.fhir_body import BodyLimits, _body_problem, _has_duplicate_keys, _shape_problem

LIMITS = BodyLimits()

# Text with the characters that matter here: controls (refused), DEL, tab/CR/LF (allowed).
_text = st.text(alphabet=st.sampled_from(["a", "é", "\x00", "\x08", "\x0c", "\x1f", "\x7f", "\t", "\n"]))
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | _text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_text, children, max_size=3),
    max_leaves=20,
)


def _nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for i in range(depth - 1):
        value = [value] if i % 2 else {"k": value}
    return value


@settings(max_examples=400, deadline=None, database=None)
@given(value=_json)
def test_fast_shape_check_agrees_with_the_full_walk(value: Any) -> None:
    body = orjson.dumps(value)
    assert _body_problem(body, value, LIMITS) == _shape_problem(value, LIMITS)


def test_depth_limit_at_the_edge() -> None:
    for depth in range(LIMITS.depth - 2, LIMITS.depth + 3):
        for leaf in ([], {}, 1, "x"):
            value = _nested(depth, leaf)
            expected = _shape_problem(value, LIMITS)
            assert (expected is None) is (depth <= LIMITS.depth), (depth, leaf)
            assert _body_problem(orjson.dumps(value), value, LIMITS) == expected, (depth, leaf)


def test_long_strings_take_the_full_walk() -> None:
    value = {"a": "123456789"}
    problem = _body_problem(orjson.dumps(value), value, BodyLimits(string_chars=8))
    assert problem is not None and problem.status == 413
    assert "longer than 8 characters" in problem.text


def _reference_duplicates(body: bytes) -> bool:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        if len(dict(items)) != len(items):
            raise KeyError
        return dict(items)

    try:
        json.loads(body, object_pairs_hook=pairs)
    except KeyError:
        return True
    return False


@settings(max_examples=300, deadline=None, database=None)
@given(value=_json, repeat=st.booleans())
def test_duplicate_keys(value: Any, repeat: bool) -> None:
    body = orjson.dumps({"outer": value, "x": 1})
    if repeat:
        body = body[:-1] + b',"x":2}'
    assert _has_duplicate_keys(body) is _reference_duplicates(body) is repeat

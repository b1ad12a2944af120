"""Blind indexes: normalisation, HMAC construction, domain separation."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from security.blind_index import BlindIndexer, normalise_identifier

KEY = bytes(range(32))
PASSPORT = "urn:oid:2.16.840.1.113883.4.330"
# Index of passport "ab123456" under KEY, computed once and kept as a literal:
# stored indexes become useless if the construction ever drifts.
PINNED_IDENTIFIER = "cec0458412379c940544026ea644e84e"


@pytest.mark.parametrize(
    "typed",
    [
        "AB 123-456",
        "ab123456",
        "  AB123456\t",
        "AB.123.456",
        "a b 1 2 3 4 5 6",
        "ＡＢ１２３４５６",  # noqa: RUF001 - full-width is the point of the test
        "AB\u2010123\u2013456",
        "AB\u00a0123\u200b456",
        "AB\u00ad123456",
    ],
)
def test_passport_spellings_normalise_alike(typed: str) -> None:
    assert normalise_identifier(PASSPORT, typed) == "ab123456"


def test_normalisation_keeps_distinct_values_distinct() -> None:
    assert normalise_identifier(PASSPORT, "AB123456") != normalise_identifier(PASSPORT, "AB123457")
    assert normalise_identifier(PASSPORT, "AB/123") == "ab/123"
    assert normalise_identifier(PASSPORT, "Straße") == normalise_identifier(PASSPORT, "STRASSE")


def test_blank_inputs_rejected() -> None:
    with pytest.raises(ValueError):
        normalise_identifier(PASSPORT, " - . ")
    with pytest.raises(ValueError):
        normalise_identifier("  ", "AB123")


def test_identifier_matches_documented_construction() -> None:
    indexer = BlindIndexer(KEY)
    expected = hmac.new(
        KEY, b"identifier\x00" + PASSPORT.encode() + b"\x00ab123456", hashlib.sha256
    ).digest()[:16]
    assert indexer.identifier(PASSPORT, "AB 123-456") == expected
    assert indexer.identifier(PASSPORT, "AB 123-456").hex() == PINNED_IDENTIFIER


def test_identifier_equal_for_equivalent_spellings() -> None:
    indexer = BlindIndexer(KEY)
    a = indexer.identifier(PASSPORT, "AB 123-456")
    assert a == indexer.identifier(f"  {PASSPORT} ", "ab123456")
    assert len(a) == 16


def test_identifier_differs_by_value_system_and_key() -> None:
    indexer = BlindIndexer(KEY)
    base = indexer.identifier(PASSPORT, "AB123456")
    assert base != indexer.identifier(PASSPORT, "AB123457")
    assert base != indexer.identifier("urn:example:case", "AB123456")
    # The system is a URI, compared exactly (not case-folded).
    assert indexer.identifier("urn:X", "1") != indexer.identifier("urn:x", "1")
    assert base != BlindIndexer(bytes(32)).identifier(PASSPORT, "AB123456")


def test_size() -> None:
    assert len(BlindIndexer(KEY, size=32).identifier(PASSPORT, "x")) == 32
    full = BlindIndexer(KEY, size=32).identifier(PASSPORT, "x")
    assert BlindIndexer(KEY, size=8).identifier(PASSPORT, "x") == full[:8]
    for bad in (0, 7, 33):
        with pytest.raises(ValueError):
            BlindIndexer(KEY, size=bad)
    with pytest.raises(ValueError):
        BlindIndexer(KEY[:16])


def test_nul_cannot_shift_field_boundaries() -> None:
    indexer = BlindIndexer(KEY)
    with pytest.raises(ValueError):
        indexer.identifier("urn:a\x00b", "c")
    with pytest.raises(ValueError):
        indexer.token("kind\x00x", "urn:s", "c")
    with pytest.raises(ValueError):
        indexer.token("kind", "urn:s\x00x", "c")


def test_token_construction_and_domain_separation() -> None:
    indexer = BlindIndexer(KEY)
    loinc = "http://loinc.org"
    tok = indexer.token("observation-code", loinc, " 8480-6 ")
    expected = hmac.new(
        KEY, b"token\x00observation-code\x00http://loinc.org\x008480-6", hashlib.sha256
    ).digest()[:16]
    assert tok == expected
    # Hyphens and case are significant in codes.
    assert tok != indexer.token("observation-code", loinc, "84806")
    assert indexer.token("k", "urn:s", "Ab") != indexer.token("k", "urn:s", "ab")
    # Kinds, and tokens versus identifiers, never collide.
    assert tok != indexer.token("condition-code", loinc, "8480-6")
    assert indexer.token("identifier", "urn:s", "x") != indexer.identifier("urn:s", "x")
    with pytest.raises(ValueError):
        indexer.token("", loinc, "1")
    with pytest.raises(ValueError):
        indexer.token("k", loinc, "  ")


def test_repr_does_not_show_the_key() -> None:
    assert KEY.hex() not in repr(BlindIndexer(KEY))


@given(value=st.text(max_size=40))
def test_normalisation_is_idempotent(value: str) -> None:
    try:
        once = normalise_identifier(PASSPORT, value)
    except ValueError:
        assume(False)
        return
    assert normalise_identifier(PASSPORT, once) == once
    assert not any(ch.isspace() or ch in "-." for ch in once)


@given(value=st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 -.", min_size=1, max_size=30))
def test_ascii_case_and_separators_do_not_matter(value: str) -> None:
    assume(any(ch.isalnum() for ch in value))
    indexer = BlindIndexer(KEY)
    compact = "".join(ch for ch in value if ch.isalnum()).lower()
    assert indexer.identifier(PASSPORT, value) == indexer.identifier(PASSPORT, compact)

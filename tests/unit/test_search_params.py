"""Search parameter parsing: what may go into a link, and what a search may name."""

from __future__ import annotations

import os

import pytest

from security.blind_index import BlindIndexer
from service.domain.errors import Invalid
from service.http.errors import fhir_error
from service.records.search_params import IDENTIFYING_PARAMETERS, SEARCH_PARAMETERS, parse_search

INDEXER = BlindIndexer(os.urandom(32))
PASSPORT = "http://hl7.org/fhir/sid/passport-SYR"


def test_no_search_pages_an_identifier_search_by_offset() -> None:
    # value-concept searches page by _offset in their links, which cannot carry hidden
    # parameters: a search with both would have to write identifiers into a URL, so it is refused.
    for rtype, params in SEARCH_PARAMETERS.items():
        if "value-concept" in params and params & IDENTIFYING_PARAMETERS:
            with pytest.raises(Invalid) as refused:
                parse_search(
                    rtype,
                    [
                        ("identifier", f"{PASSPORT}|N014782936"),
                        ("value-concept", "http://loinc.org|LA6576-8"),
                    ],
                    INDEXER,
                    lenient=True,
                )
            assert fhir_error(refused.value).status == 400, rtype


def test_identifiers_are_kept_out_of_the_linkable_parameters() -> None:
    parsed = parse_search(
        "Patient",
        [("identifier", f"{PASSPORT}|N014782936"), ("_lastUpdated", "ge2024")],
        INDEXER,
        lenient=False,
    )
    assert parsed.linkable == [("_lastUpdated", "ge2024")]
    assert [kind for kind, _ in parsed.hidden] == ["identifier"]


def test_a_search_names_at_most_fifty_identifiers() -> None:
    fifty = ",".join(f"{PASSPORT}|P{i}" for i in range(50))
    assert len(parse_search("Patient", [("identifier", fifty)], INDEXER, lenient=False).hidden[0][1]) == 50
    with pytest.raises(Invalid) as refused:
        parse_search(
            "Patient", [("identifier", fifty), ("identifier", f"{PASSPORT}|X")], INDEXER, lenient=False
        )
    assert fhir_error(refused.value).status == 400

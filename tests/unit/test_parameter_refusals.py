"""Search, history/$everything and $export parameters are refused with domain errors.

The parsers are use-cases' input checks: they name what is wrong (a kind, the parameter, a FHIR
issue type finer than the kind's default) and know no HTTP. The one mapping (service.http.errors)
gives the answer its status; these tests pin that the answer is the one clients always got.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from security.blind_index import BlindIndexer
from service.bulk.parameters import check_prefer, parse_export_parameters
from service.domain.errors import DomainError, Invalid, NotFound
from service.http.errors import FhirError, fhir_error
from service.records.operation_params import parse_page_parameters
from service.records.search_params import MAX_COUNT, parse_search

INDEXER = BlindIndexer(os.urandom(32))
PAGE_PARAMETERS = frozenset({"_count", "_since", "_at", "_type", "_cursor", "_summary", "_elements"})


def _outcome(work: Callable[[], Any], kind: type[DomainError]) -> tuple[int, str, str, list[str] | None]:
    with pytest.raises(kind) as refused:
        work()
    assert not isinstance(refused.value, FhirError)
    answer = fhir_error(refused.value)
    (issue,) = [i.as_fhir() for i in answer.issues]
    return answer.status, issue["code"], issue["diagnostics"], issue.get("expression")


def test_a_type_that_is_not_searchable_is_a_404_not_supported() -> None:
    work = lambda: parse_search("Basic", [], INDEXER, lenient=False)  # noqa: E731
    assert _outcome(work, NotFound) == (404, "not-supported", "Basic is not searchable here", None)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ([("_count", "-1")], (400, "invalid", f"_count must be 0 to {MAX_COUNT}", ["_count"])),
        ([("colour", "red")], (400, "not-supported", "unknown or unsupported search parameter", ["colour"])),
        # A control character is refused without naming where: the expression stays out.
        ([("_id", "a\x00b")], (400, "invalid", "search parameters must not hold control characters", None)),
    ],
)
def test_a_bad_search_parameter_is_a_400_naming_the_parameter_only(
    params: list[tuple[str, str]], expected: tuple[int, str, str, list[str] | None]
) -> None:
    assert _outcome(lambda: parse_search("Patient", params, INDEXER, lenient=False), Invalid) == expected


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ([("_count", "5000")], (400, "invalid", f"_count must be 0 to {MAX_COUNT}", ["_count"])),
        (
            [("_type", "Basic")],
            (400, "not-supported", "_type needs resource types this server stores", ["_type"]),
        ),
        (
            [("_since", "yesterday")],
            (400, "invalid", "_since needs a FHIR instant (or date/dateTime)", ["_since"]),
        ),
        ([("_sort", "x")], (400, "not-supported", "unknown or unsupported parameter", ["_sort"])),
    ],
)
def test_a_bad_page_parameter_is_a_400(
    params: list[tuple[str, str]], expected: tuple[int, str, str, list[str] | None]
) -> None:
    work = lambda: parse_page_parameters(params, allowed=PAGE_PARAMETERS, lenient=False)  # noqa: E731
    assert _outcome(work, Invalid) == expected


def test_an_export_without_respond_async_is_a_400_required() -> None:
    expected = (400, "required", "a Bulk Data kick-off needs the header 'Prefer: respond-async'", None)
    assert _outcome(lambda: check_prefer(["return=minimal"]), Invalid) == expected
    assert check_prefer(["respond-async, handling=lenient"]) is True


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (
            [("_outputFormat", "text/csv")],
            (400, "not-supported", "_outputFormat must be application/fhir+ndjson", ["_outputFormat"]),
        ),
        (
            [("_since", "2025-02-01"), ("_until", "2025-01-01")],
            (400, "invalid", "_until must be later than _since", ["_until"]),
        ),
        (
            [("_since", "2025"), ("_since", "2026")],
            (400, "invalid", "_since is given more than once", ["_since"]),
        ),
    ],
)
def test_a_bad_export_parameter_is_a_400(
    params: list[tuple[str, str]], expected: tuple[int, str, str, list[str] | None]
) -> None:
    assert _outcome(lambda: parse_export_parameters(params, lenient=False), Invalid) == expected

"""Search paging by position: next links carry a sealed cursor that nobody can read, edit or reuse."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from mhr_testkit import EXAMPLES, Party, Service, load_example, submit


@pytest.fixture
def clinic(service: Service) -> Party:
    party = service.register("clinic", "clinic")
    for example in EXAMPLES:
        assert submit(service, party, load_example(example)).status_code == 200
    return party


def _next(bundle: dict[str, Any]) -> str | None:
    return next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)


def _walk(
    service: Service, headers: dict[str, str], first: str, params: dict[str, str]
) -> list[dict[str, Any]]:
    pages = [service.client.get(first, params=params or None, headers=headers).json()]
    while (url := _next(pages[-1])) is not None:
        response = service.client.get(url, headers=headers)
        assert response.status_code == 200, response.text
        pages.append(response.json())
    return pages


def _cursor(url: str) -> str:
    return dict(parse_qsl(urlsplit(url).query))["_cursor"]


def test_following_next_links_visits_every_match_once_in_order(service: Service, clinic: Party) -> None:
    headers = service.headers(clinic)
    pages = _walk(service, headers, "/fhir/Observation", {"_count": "4"})
    total = pages[0]["total"]
    assert total > 8, "the examples should give several pages"
    ids = [e["resource"]["id"] for page in pages for e in page["entry"]]
    assert len(ids) == len(set(ids)) == total
    assert all(page["total"] == total for page in pages), "every page carries the first page's total"
    updated = [e["resource"]["meta"]["lastUpdated"] for page in pages for e in page["entry"]]
    assert updated == sorted(updated, reverse=True)
    oldest_first = _walk(service, headers, "/fhir/Observation", {"_count": "4", "_sort": "_lastUpdated"})
    assert [e["resource"]["id"] for page in oldest_first for e in page["entry"]] == ids[::-1]
    assert all("_cursor=" in (_next(page) or "_cursor=") for page in pages)


def test_a_resource_written_between_pages_shifts_nothing(service: Service, clinic: Party) -> None:
    headers = service.headers(clinic)
    first = service.client.get("/fhir/Observation", params={"_count": "3"}, headers=headers).json()
    assert submit(service, clinic, load_example(EXAMPLES[0])).status_code == 200  # a newer exam
    rest = _walk(service, headers, _next(first) or "", {})
    seen = [e["resource"]["id"] for page in [first, *rest] for e in page["entry"]]
    assert len(seen) == len(set(seen)) == first["total"]


def test_total_none_skips_the_count_but_still_pages(service: Service, clinic: Party) -> None:
    headers = service.headers(clinic)
    pages = _walk(service, headers, "/fhir/Observation", {"_count": "5", "_total": "none"})
    assert len(pages) > 1 and all("total" not in page for page in pages)
    counted = service.client.get("/fhir/Observation", params={"_total": "accurate"}, headers=headers).json()
    assert sum(len(page["entry"]) for page in pages) == counted["total"]
    bad = service.client.get("/fhir/Observation", params={"_total": "some"}, headers=headers)
    assert bad.status_code == 400 and bad.json()["issue"][0]["expression"] == ["_total"]


def _refused(response: Any) -> None:
    assert response.status_code == 400, response.text
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["expression"] == ["_cursor"]


def test_an_edited_foreign_or_misapplied_cursor_is_refused(service: Service, clinic: Party) -> None:
    headers = service.headers(clinic)
    first = service.client.get("/fhir/Observation", params={"_count": "3"}, headers=headers).json()
    url = _next(first)
    assert url is not None
    cursor = _cursor(url)
    middle = len(cursor) // 2
    edited = cursor[:middle] + ("B" if cursor[middle] != "B" else "C") + cursor[middle + 1 :]
    _refused(
        service.client.get("/fhir/Observation", params={"_count": "3", "_cursor": edited}, headers=headers)
    )
    _refused(service.client.get("/fhir/Observation", params={"_cursor": "garbage"}, headers=headers))
    _refused(service.client.get("/fhir/Observation", params={"_cursor": "x" * 600 + ".y"}, headers=headers))
    # The same cursor on another search, or by another client of the same clinic organization.
    _refused(
        service.client.get("/fhir/Observation", params={"_cursor": cursor, "code": "x|y"}, headers=headers)
    )
    _refused(service.client.get("/fhir/Encounter", params={"_cursor": cursor}, headers=headers))
    other = service.register("clinic-second-client", "clinic")
    _refused(service.client.get(url, headers=service.headers(other)))
    both = service.client.get(
        "/fhir/Observation", params={"_cursor": cursor, "_offset": "3"}, headers=headers
    )
    assert both.status_code == 400

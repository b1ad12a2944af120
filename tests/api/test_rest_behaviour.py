"""REST behaviour as FHIR R4 says (http.html, search.html): history Bundles, paging, formats,
Prefer, references in search parameters, $everything paging."""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from mhr_testkit import BASE_URL, EXAMPLES, FHIR_HEADERS, Party, Service, load_example, submit

FHIR_BASE = f"{BASE_URL}/fhir"


@pytest.fixture
def clinic(service: Service) -> Party:
    return service.register("clinic", "clinic")


def _ids(reply: Any, rtype: str) -> list[str]:
    return [
        e["response"]["location"].split("/")[1]
        for e in reply.json()["entry"]
        if e["response"]["location"].startswith(f"{rtype}/")
    ]


def _link(bundle: dict[str, Any], relation: str) -> str | None:
    return next((lk["url"] for lk in bundle.get("link", []) if lk["relation"] == relation), None)


def _patient_with_versions(
    service: Service, clinic: Party, versions: int, pause: float = 0.0
) -> tuple[str, dict[str, Any]]:
    """A submitted exam's Patient, updated until it has ``versions`` versions (``pause`` seconds
    apart)."""
    reply = submit(service, clinic, load_example(EXAMPLES[0]))
    assert reply.status_code == 200, reply.text
    (patient_id,) = _ids(reply, "Patient")
    headers = {**FHIR_HEADERS, **service.headers(clinic)}
    patient = service.client.get(f"/fhir/Patient/{patient_id}", headers=headers).json()
    for n in range(2, versions + 1):
        time.sleep(pause)
        patient["gender"] = "female" if n % 2 else "male"
        answer = service.client.put(
            f"/fhir/Patient/{patient_id}", content=json.dumps(patient), headers=headers
        )
        assert answer.status_code == 200, answer.text
    return patient_id, headers


# --------------------------------------------------------------------------- history


def test_history_is_a_valid_history_bundle_newest_first(service: Service, clinic: Party) -> None:
    patient_id, headers = _patient_with_versions(service, clinic, 3)
    bundle = service.client.get(f"/fhir/Patient/{patient_id}/_history", headers=headers).json()
    assert bundle["type"] == "history" and bundle["total"] == 3
    entries = bundle["entry"]
    assert [e["resource"]["meta"]["versionId"] for e in entries] == ["3", "2", "1"]
    for entry in entries:
        version = entry["resource"]["meta"]["versionId"]
        assert entry["fullUrl"] == f"{FHIR_BASE}/Patient/{patient_id}"
        assert entry["response"]["etag"] == f'W/"{version}"'
        assert entry["response"]["lastModified"] == entry["resource"]["meta"]["lastUpdated"]
    assert entries[-1]["request"] == {"method": "POST", "url": "Patient"}
    assert entries[-1]["response"]["status"] == "201 Created"
    assert entries[0]["request"] == {"method": "PUT", "url": f"Patient/{patient_id}"}
    assert entries[0]["response"]["status"] == "200 OK"


def test_history_pages_with_count_and_a_signed_next_link(service: Service, clinic: Party) -> None:
    patient_id, headers = _patient_with_versions(service, clinic, 5)
    url: str | None = f"/fhir/Patient/{patient_id}/_history?_count=2"
    pages = []
    while url is not None:
        answer = service.client.get(url, headers=headers)
        assert answer.status_code == 200, answer.text
        pages.append(answer.json())
        url = _link(pages[-1], "next")
    assert [len(p["entry"]) for p in pages] == [2, 2, 1]
    versions = [e["resource"]["meta"]["versionId"] for p in pages for e in p["entry"]]
    assert versions == ["5", "4", "3", "2", "1"]
    assert all(p["total"] == 5 for p in pages)
    # The cursor is bound to this history: edited, or used on another resource, it is refused.
    second = _link(pages[0], "next") or ""
    cursor = dict(parse_qsl(urlsplit(second).query))["_cursor"]
    edited = service.client.get(
        f"/fhir/Patient/{patient_id}/_history",
        params={"_count": "2", "_cursor": "x" + cursor},
        headers=headers,
    )
    assert edited.status_code == 400 and edited.json()["issue"][0]["expression"] == ["_cursor"]
    (other,) = _ids(submit(service, clinic, load_example(EXAMPLES[1])), "Patient")
    assert other != patient_id
    foreign = service.client.get(
        f"/fhir/Patient/{other}/_history", params={"_count": "2", "_cursor": cursor}, headers=headers
    )
    assert foreign.status_code == 400


def test_history_honours_since_and_at(service: Service, clinic: Party) -> None:
    # _at of an instant covers its second: the versions are written more than a second apart.
    patient_id, headers = _patient_with_versions(service, clinic, 2, pause=1.1)
    path = f"/fhir/Patient/{patient_id}/_history"
    everything = service.client.get(path, headers=headers).json()["entry"]
    newest = everything[0]["resource"]["meta"]["lastUpdated"]
    oldest = everything[1]["resource"]["meta"]["lastUpdated"]
    since = service.client.get(path, params={"_since": newest}, headers=headers).json()
    assert [e["resource"]["meta"]["versionId"] for e in since["entry"]] == ["2"]
    assert since["total"] == 1
    future = service.client.get(path, params={"_since": "2999-01-01T00:00:00Z"}, headers=headers)
    assert future.status_code == 200 and future.json()["total"] == 0 and "entry" not in future.json()
    at_first = service.client.get(path, params={"_at": oldest}, headers=headers).json()
    assert [e["resource"]["meta"]["versionId"] for e in at_first["entry"]] == ["1"]
    at_before = service.client.get(path, params={"_at": "2001-01-01"}, headers=headers).json()
    assert at_before["total"] == 0
    at_now = service.client.get(path, params={"_at": "2999-01-01"}, headers=headers).json()
    assert [e["resource"]["meta"]["versionId"] for e in at_now["entry"]] == ["2"]
    for bad in ({"_since": "yesterday"}, {"_count": "-1"}, {"_count": "101"}, {"_sort": "_lastUpdated"}):
        assert service.client.get(path, params=bad, headers=headers).status_code == 400, bad


def test_history_of_a_withheld_or_absent_resource_is_404_even_with_filters(
    service: Service, clinic: Party
) -> None:
    patient_id, headers = _patient_with_versions(service, clinic, 1)
    other = service.register("other clinic", "clinic")
    for params in ({}, {"_since": "2999-01-01T00:00:00Z"}, {"_count": "0"}):
        path = f"/fhir/Patient/{patient_id}/_history"
        assert service.client.get(path, params=params, headers=service.headers(other)).status_code == 404
        absent = "/fhir/Patient/00000000-0000-4000-8000-000000000000/_history"
        assert service.client.get(absent, params=params, headers=headers).status_code == 404


# --------------------------------------------------------------------------- search results


def test_count_zero_and_summary_count_give_the_total_only(service: Service, clinic: Party) -> None:
    assert submit(service, clinic, load_example(EXAMPLES[0])).status_code == 200
    headers = service.headers(clinic)
    full = service.client.get("/fhir/Observation", params={"_total": "accurate"}, headers=headers).json()
    assert full["total"] > 0
    for params in ({"_count": "0"}, {"_summary": "count"}):
        bundle = service.client.get("/fhir/Observation", params=params, headers=headers).json()
        assert bundle["total"] == full["total"] and "entry" not in bundle, params
        assert _link(bundle, "next") is None
    patient_id = full["entry"][0]["resource"]["subject"]["reference"].split("/")[1]
    counted = service.client.get(
        f"/fhir/Patient/{patient_id}/_history?_summary=count", headers=headers
    ).json()
    assert counted["total"] == 1 and "entry" not in counted
    refused = service.client.get("/fhir/Observation", params={"_summary": "text"}, headers=headers)
    assert refused.status_code == 400 and refused.json()["issue"][0]["expression"] == ["_summary"]


def test_elements_returns_only_those_elements_marked_subsetted(service: Service, clinic: Party) -> None:
    reply = submit(service, clinic, load_example(EXAMPLES[0]))
    headers = service.headers(clinic)
    bundle = service.client.get(
        "/fhir/Observation", params={"_elements": "status,code"}, headers=headers
    ).json()
    for entry in bundle["entry"]:
        resource = entry["resource"]
        assert set(resource) <= {"resourceType", "id", "meta", "status", "code"}
        assert {"status", "code"} <= set(resource)
        assert {"code": "SUBSETTED"}.items() <= resource["meta"]["tag"][-1].items()
    assert "_elements=status%2Ccode" in (_link(bundle, "self") or "")
    (patient_id,) = _ids(reply, "Patient")
    read = service.client.get(f"/fhir/Patient/{patient_id}", params={"_elements": "gender"}, headers=headers)
    assert set(read.json()) == {"resourceType", "id", "meta", "gender"}
    plain = service.client.get(f"/fhir/Patient/{patient_id}", headers=headers).json()
    assert "identifier" in plain and not any(
        t.get("code") == "SUBSETTED" for t in plain["meta"].get("tag", [])
    )
    bad = service.client.get("/fhir/Observation", params={"_elements": "a.b"}, headers=headers)
    assert bad.status_code == 400


def test_self_link_describes_the_search_without_the_identifier(service: Service, clinic: Party) -> None:
    bundle = load_example(EXAMPLES[0])
    assert submit(service, clinic, bundle).status_code == 200
    identifier = bundle["entry"][0]["resource"]["identifier"][0]
    headers = service.headers(clinic)
    form = {"identifier": f"{identifier['system']}|{identifier['value']}", "_count": "5"}
    found = service.client.post(
        "/fhir/Patient/_search",
        content="&".join(f"{k}={v}" for k, v in form.items()),
        headers={**headers, "Content-Type": "application/x-www-form-urlencoded"},
    ).json()
    assert found["total"] == 1
    self_link = _link(found, "self") or ""
    params = dict(parse_qsl(urlsplit(self_link).query))
    assert params["identifier"] == "masked" and params["_count"] == "5"
    assert identifier["value"] not in self_link
    search = service.client.get(
        "/fhir/Observation",
        params={"_sort": "_lastUpdated", "code": "http://loinc.org|71773-6"},
        headers=headers,
    ).json()
    applied = dict(parse_qsl(urlsplit(_link(search, "self") or "").query))
    assert applied["_sort"] == "_lastUpdated" and applied["code"] == "http://loinc.org|71773-6"


# --------------------------------------------------------------------------- formats


def test_every_fhir_response_says_utf8(service: Service, clinic: Party) -> None:
    reply = submit(service, clinic, load_example(EXAMPLES[0]))
    (patient_id,) = _ids(reply, "Patient")
    headers = service.headers(clinic)
    answers = [
        reply,
        service.client.get("/fhir/metadata"),
        service.client.get(f"/fhir/Patient/{patient_id}", headers=headers),
        service.client.get("/fhir/Observation", headers=headers),
        service.client.get(f"/fhir/Patient/{patient_id}/_history", headers=headers),
        service.client.get("/fhir/Patient/00000000-0000-4000-8000-000000000000", headers=headers),
        service.client.get("/fhir/Observation?bogus=1", headers=headers),
    ]
    for answer in answers:
        assert answer.headers["content-type"] == "application/fhir+json; charset=utf-8", answer.request.url


def test_format_json_works_pretty_indents_and_xml_is_406(service: Service, clinic: Party) -> None:
    reply = submit(service, clinic, load_example(EXAMPLES[0]))
    (patient_id,) = _ids(reply, "Patient")
    headers = service.headers(clinic)
    path = f"/fhir/Patient/{patient_id}"
    plain = service.client.get(path, headers=headers)
    for fmt in ("json", "application/fhir+json", "application/json", "application/json+fhir"):
        answer = service.client.get(path, params={"_format": fmt}, headers=headers)
        assert answer.status_code == 200 and answer.content == plain.content, fmt
    assert service.client.get("/fhir/Observation?_format=json", headers=headers).status_code == 200
    unescaped = service.client.get(f"{path}?_format=application/fhir+json", headers=headers)
    assert unescaped.status_code == 200, unescaped.text
    pretty = service.client.get(path, params={"_pretty": "true"}, headers=headers)
    assert pretty.status_code == 200 and b"\n  " in pretty.content and b"\n" not in plain.content
    assert pretty.json() == plain.json()
    assert int(pretty.headers["content-length"]) == len(pretty.content)
    for params, accept in (
        ({"_format": "xml"}, None),
        ({"_format": "application/fhir+xml"}, None),
        ({}, "application/fhir+xml"),
        ({}, "application/xml, text/xml"),
    ):
        extra = {"Accept": accept} if accept else {}
        refused = service.client.get(path, params=params, headers={**headers, **extra})
        assert refused.status_code == 406, (params, accept)
        assert refused.json()["resourceType"] == "OperationOutcome"
    for accept in ("application/fhir+json", "application/fhir+xml, application/fhir+json;q=0.5", "*/*"):
        assert service.client.get(path, headers={**headers, "Accept": accept}).status_code == 200, accept


# --------------------------------------------------------------------------- Prefer


def test_prefer_return_on_create_update_and_transaction(service: Service, clinic: Party) -> None:
    headers = {**FHIR_HEADERS, **service.headers(clinic)}
    bundle = load_example(EXAMPLES[0])
    patient = bundle["entry"][0]["resource"]
    before = time.time() - 2
    created = service.client.post(
        "/fhir/Patient", content=json.dumps(patient), headers={**headers, "Prefer": "return=minimal"}
    )
    assert created.status_code == 201 and created.content == b""
    assert created.headers["etag"] == 'W/"1"' and "/_history/1" in created.headers["location"]
    from email.utils import parsedate_to_datetime

    assert parsedate_to_datetime(created.headers["last-modified"]).timestamp() >= before
    patient_id = created.headers["location"].split("/Patient/")[1].split("/")[0]
    stored = service.client.get(f"/fhir/Patient/{patient_id}", headers=headers).json()
    outcome = service.client.put(
        f"/fhir/Patient/{patient_id}",
        content=json.dumps(stored),
        headers={**headers, "Prefer": "return=OperationOutcome"},
    )
    assert outcome.status_code == 200 and outcome.json()["resourceType"] == "OperationOutcome"
    assert outcome.headers["etag"] == 'W/"2"' and "last-modified" in outcome.headers
    represented = service.client.put(
        f"/fhir/Patient/{patient_id}",
        content=json.dumps(stored),
        headers={**headers, "Prefer": "return=representation"},
    )
    assert represented.json()["meta"]["versionId"] == "3" and "last-modified" in represented.headers
    default = service.client.post("/fhir/Patient", content=json.dumps(patient), headers=headers)
    assert default.json()["resourceType"] == "Patient" and "last-modified" in default.headers

    bundle = load_example(EXAMPLES[1])  # a migrant not yet created by hand: ifNoneExist finds one
    with_bodies = service.client.post(
        "/fhir", content=json.dumps(bundle), headers={**headers, "Prefer": "return=representation"}
    ).json()
    assert all(e["resource"]["resourceType"] for e in with_bodies["entry"])
    with_outcomes = service.client.post(
        "/fhir", content=json.dumps(bundle), headers={**headers, "Prefer": "return=OperationOutcome"}
    ).json()
    assert all(e["response"]["outcome"]["resourceType"] == "OperationOutcome" for e in with_outcomes["entry"])
    minimal = service.client.post(
        "/fhir", content=json.dumps(bundle), headers={**headers, "Prefer": "return=minimal"}
    ).json()
    assert all(set(e) == {"response"} for e in minimal["entry"])


# --------------------------------------------------------------------------- references


def test_patient_accepts_absolute_relative_and_bare_references(service: Service, clinic: Party) -> None:
    reply = submit(service, clinic, load_example(EXAMPLES[0]))
    (patient_id,) = _ids(reply, "Patient")
    headers = service.headers(clinic)
    expected = service.client.get("/fhir/Observation", params={"patient": patient_id}, headers=headers).json()
    assert expected["total"] > 0
    for value in (
        f"Patient/{patient_id}",
        f"{FHIR_BASE}/Patient/{patient_id}",
        f"{FHIR_BASE.replace('http://', 'https://')}/Patient/{patient_id}",
    ):
        found = service.client.get("/fhir/Observation", params={"patient": value}, headers=headers).json()
        assert found["total"] == expected["total"], value
    for value in (f"https://elsewhere.example/fhir/Patient/{patient_id}", f"Group/{patient_id}"):
        found = service.client.get("/fhir/Observation", params={"patient": value}, headers=headers).json()
        assert found["total"] == 0, value


# --------------------------------------------------------------------------- $everything


def test_everything_pages_filters_and_accepts_post(service: Service, clinic: Party) -> None:
    reply = submit(service, clinic, load_example(EXAMPLES[0]))
    (patient_id,) = _ids(reply, "Patient")
    headers = service.headers(clinic)
    path = f"/fhir/Patient/{patient_id}/$everything"
    whole = service.client.get(path, headers=headers).json()
    total = whole["total"]
    assert total == len(whole["entry"]) > 3
    assert whole["entry"][0]["resource"]["resourceType"] == "Patient"
    for size in ("1", "3"):
        url: str | None = f"{path}?_count={size}"
        seen: list[str] = []
        while url is not None:
            page = service.client.get(url, headers=headers).json()
            assert len(page["entry"]) <= int(size) and page["total"] == total
            seen += [f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in page["entry"]]
            url = _link(page, "next")
        expected = [f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in whole["entry"]]
        assert seen == expected, size
    typed = service.client.get(path, params={"_type": "Observation,Patient"}, headers=headers).json()
    assert {e["resource"]["resourceType"] for e in typed["entry"]} == {"Observation", "Patient"}
    later = service.client.get(path, params={"_since": "2999-01-01T00:00:00Z"}, headers=headers).json()
    assert later["total"] == 0 and "entry" not in later
    posted = service.client.post(
        path,
        content=json.dumps(
            {"resourceType": "Parameters", "parameter": [{"name": "_type", "valueString": "Observation"}]}
        ),
        headers={**headers, **FHIR_HEADERS},
    ).json()
    assert {e["resource"]["resourceType"] for e in posted["entry"]} == {"Observation"}
    assert service.client.post(path, headers=headers).json()["total"] == total
    for bad in ({"_type": "Nonsense"}, {"start": "2020"}, {"_since": "soon"}):
        assert service.client.get(path, params=bad, headers=headers).status_code == 400, bad
    for body in (
        {"resourceType": "Patient"},
        {"resourceType": "Parameters", "parameter": 5},
        {"resourceType": "Parameters", "parameter": [{"name": "_count"}]},
        {"resourceType": "Parameters", "parameter": [{"name": "_count", "valueInteger": 5000}]},
    ):
        refused = service.client.post(path, content=json.dumps(body), headers={**headers, **FHIR_HEADERS})
        assert refused.status_code == 400 and refused.json()["resourceType"] == "OperationOutcome", body


# --------------------------------------------------------------------------- Organization, AuditEvent


def test_organization_name_matches_a_prefix_ignoring_case_and_accents(
    service: Service, clinic: Party
) -> None:
    service.register("Santé Publique Québec", "authority")
    service.register("Public Health Agency", "authority")
    headers = service.headers(clinic)

    def names(value: str) -> list[str]:
        bundle = service.client.get("/fhir/Organization", params={"name": value}, headers=headers).json()
        # The test kit makes names unique with a suffix.
        return [e["resource"]["name"].rsplit(" ", 1)[0] for e in bundle.get("entry", [])]

    for value in ("Santé Publique Québec", "sante", "SANTÉ pub", "santé publique quebec"):
        assert names(value) == ["Santé Publique Québec"], value
    assert names("public") == ["Public Health Agency"]  # a prefix, not a substring
    assert names("Québec") == []
    assert names("x" * 10) == []


def test_auditevent_agent_is_a_reference_and_the_token_form_still_works(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    other = service.register("other clinic", "clinic")
    service.token(clinic)
    service.token(other)
    auditor = service.register("auditor", "auditor")
    headers = service.headers(auditor, "system/AuditEvent.rs")

    def clients(**params: str) -> set[str]:
        answer = service.client.get("/fhir/AuditEvent", params={**params, "type": "110114"}, headers=headers)
        assert answer.status_code == 200, answer.text
        return {
            agent["who"]["identifier"]["value"]
            for entry in answer.json().get("entry", [])
            for agent in entry["resource"]["agent"]
            if "identifier" in agent["who"]
        } & {clinic.client_id, other.client_id}

    by_reference = clients(agent=f"Organization/{clinic.organization_id}")
    assert by_reference == {clinic.client_id}
    assert clients(agent=f"{FHIR_BASE}/Organization/{other.organization_id}") == {other.client_id}
    assert clients(**{"agent:identifier": clinic.client_id}) == {clinic.client_id}
    assert clients(agent=clinic.client_id) == {clinic.client_id}  # the earlier token form
    assert clients(agent=f"urn:any|{other.client_id}") == {other.client_id}
    wrong = service.client.get("/fhir/AuditEvent", params={"agent": "Practitioner/1"}, headers=headers)
    assert wrong.status_code == 400 and wrong.json()["issue"][0]["expression"] == ["agent"]

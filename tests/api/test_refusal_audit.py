"""Every refusal is on the audit record (issue 11 item 7), with bounded growth for unidentified callers.

An identified caller's refusal gets its own entry, whatever refused it: a route, a
dependency, the router (no such route, 405) or the request layer (413). Refusals of
callers nobody identified, and throttled ones, are counted: one entry per source,
route, status and minute, written once the minute is over and at shutdown.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from fhir.resources.R4B.auditevent import AuditEvent
from mhr_testkit import FHIR_HEADERS, JWT_BEARER, Service, sync_url

from security.jwk import generate_client_key, sign_client_assertion
from service.api.deps import PrincipalDep
from service.audit.fhir import audit_event
from service.audit.tally import RefusalKey, RefusalTally, run_flusher, stop_flusher

SECRET = "P7734910QX"  # a passport number a caller typed: never in an audit entry


def audit_contents(url: str) -> list[dict[str, Any]]:
    engine = sa.create_engine(sync_url(url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT content FROM audit_entries ORDER BY id")).scalars().all()
    finally:
        engine.dispose()
    return [json.loads(bytes(r)) for r in rows]


def entries_of(url: str, response: Any) -> list[dict[str, Any]]:
    request_id = response.headers["x-request-id"]
    return [c for c in audit_contents(url) if c["request"] == request_id]


def _refusals(service: Service, headers: dict[str, str]) -> dict[str, Any]:
    """One request per kind of refusal the issue names; name -> response."""
    client = service.client
    fhir = {**FHIR_HEADERS, **headers}
    first = client.get("/fhir/Observation", params={"_count": "1"}, headers=headers)
    assert first.status_code == 200
    return {
        "count=-1": client.get("/fhir/Patient", params={"_count": "-1"}, headers=headers),
        "unknown parameter": client.get(
            "/fhir/Patient", params={"bogus": SECRET, "identifier": f"urn:x|{SECRET}"}, headers=headers
        ),
        "bad cursor": client.get("/fhir/Observation", params={"_cursor": SECRET}, headers=headers),
        "refused write": client.post(
            "/fhir/Observation", content=json.dumps({"resourceType": "Patient"}), headers=fhir
        ),
        "not json": client.post("/fhir", content=b"{" + SECRET.encode(), headers=fhir),
        "405": client.patch("/fhir/Observation/abc", content=b"{}", headers=fhir),
        "unknown type": client.get(f"/fhir/Secret{SECRET}/1", headers=headers),
        "no such route": client.get(f"/nowhere/{SECRET}", headers=headers),
        "413": client.post("/fhir", content=b" " * 4096, headers=fhir),
        "415": client.post("/fhir", content=b"{}", headers={**headers, "Content-Type": "text/plain"}),
        "500": client.get("/fhir/_test-failure", headers=headers),
    }


async def _failing_route(principal: PrincipalDep) -> None:
    raise RuntimeError(f"bug holding {SECRET}")


def _add_failing_route(service: Service) -> None:
    """A route that fails as a bug would (there is no input that makes the real ones fail)."""
    app = service.fastapi  # type: ignore[attr-defined]
    app.router.add_api_route("/fhir/_test-failure", _failing_route, methods=["GET"])
    app.router.routes.insert(0, app.router.routes.pop())  # before the generic /fhir/{type} routes


def test_every_refusal_of_an_identified_client_has_its_entry(database_url: str, tmp_path: Path) -> None:
    with Service.start(database_url, tmp_path, max_request_bytes=2048) as service:
        _add_failing_route(service)
        clinic = service.register("clinic", "clinic")
        responses = _refusals(service, service.headers(clinic))
        statuses = {name: r.status_code for name, r in responses.items()}
        assert statuses == {
            "count=-1": 400,
            "unknown parameter": 400,
            "bad cursor": 400,
            "refused write": statuses["refused write"],
            "not json": 400,
            "405": 405,
            "unknown type": 404,
            "no such route": 404,
            "413": 413,
            "415": 415,
            "500": 500,
        }
        assert statuses["refused write"] in (400, 422)
        for name, response in responses.items():
            found = entries_of(database_url, response)
            assert len(found) == 1, f"{name}: {len(found)} entries"
            entry = found[0]
            assert entry["agent"]["client"] == clinic.client_id, name
            assert entry["agent"]["organization"] == clinic.organization_id, name
            assert entry["outcome"] == ("8" if response.status_code >= 500 else "4"), name
            assert "aggregate" not in entry, name
            assert SECRET not in json.dumps(entry), name  # route templates and fixed reasons only


def test_refusals_of_unidentified_callers_are_counted_not_written_one_by_one(
    database_url: str, tmp_path: Path
) -> None:
    with Service.start(database_url, tmp_path) as service:
        client = service.client
        responses = [client.get("/fhir/Patient") for _ in range(40)]
        responses += [
            client.get("/fhir/Patient", headers={"Authorization": f"Bearer {SECRET}.x.y"}) for _ in range(25)
        ]
        responses += [client.get(f"/nowhere/{i}") for i in range(10)]
        assert {r.status_code for r in responses} == {401, 404}
        for response in responses[:3]:
            assert entries_of(database_url, response) == []  # no row per request ...
    # ... but every one is on the record once the service has shut down (or the minute is over).
    counted = [c for c in audit_contents(database_url) if "aggregate" in c]
    assert sum(c["aggregate"]["count"] for c in counted) == 75
    assert all(c["agent"] == {"address": "testclient"} for c in counted)
    assert {(c["route"], c["detail"].split(":")[0]) for c in counted} == {
        ("/fhir/{resource_type}", "401 GET"),
        ("unmatched", "404 GET"),
    }
    assert len(counted) <= 2 * 3  # three keys (no token, bad token, no route), at most two minutes each
    assert SECRET not in json.dumps(counted)
    assert len(audit_contents(database_url)) == len(counted)
    # Auditors read each as a valid AuditEvent saying how many, when, and from where.
    event = audit_event(1, orjson.dumps(counted[0], option=orjson.OPT_SORT_KEYS), None)
    AuditEvent.model_validate(event)
    aggregate = next(e for e in event["extension"] if e["url"].endswith("/audit-aggregate"))
    assert aggregate["extension"][0] == {"url": "count", "valueInteger": counted[0]["aggregate"]["count"]}
    assert event["agent"][0]["network"] == {"address": "testclient", "type": "2"}


def test_tally_is_bounded_per_minute_and_flushes_only_finished_minutes() -> None:
    now = [datetime(2026, 12, 1, 10, 0, 5, tzinfo=UTC)]
    tally = RefusalTally(max_keys=3, clock=lambda: now[0])
    for i in range(10):
        tally.add(RefusalKey(None, f"198.51.100.{i}", "/fhir/{resource_type}", "GET", 401, "no token"))
    assert tally.take() == []  # the minute is not over
    now[0] += timedelta(minutes=1)
    records = tally.take()
    assert len(records) == 4  # three addresses and the overflow
    assert sum(r.aggregate.count for r in records if r.aggregate) == 10
    assert [r.agent.address for r in records][-1] == "*"
    assert tally.take(everything=True) == []


def _assertion(service: Service, client_id: str) -> str:
    return sign_client_assertion(generate_client_key("EC"), client_id=client_id, token_url=service.token_url)


def test_token_endpoint_limits_per_address_and_per_client(database_url: str, tmp_path: Path) -> None:
    overrides = {
        "token_rate_per_address_per_second": 0.01,
        "token_rate_per_address_burst": 12.0,
        "token_rate_per_client_per_second": 0.01,
        "token_rate_per_client_burst": 3.0,
    }
    with Service.start(database_url, tmp_path, **overrides) as service:
        clinic = service.register("clinic", "clinic")
        # Bad assertions in the clinic's name do not use up its issuance bucket ...
        for _ in range(4):
            form = {
                "grant_type": "client_credentials",
                "client_assertion_type": JWT_BEARER,
                "client_assertion": _assertion(service, clinic.client_id),
                "scope": clinic.scopes,
            }
            assert service.client.post("/auth/token", data=form).status_code == 401
        # ... the tokens it is issued do.
        assert [service.request_token(clinic).status_code for _ in range(4)] == [200, 200, 200, 429]
        throttled = service.request_token(clinic)
        assert throttled.status_code == 429
        assert int(throttled.headers["retry-after"]) >= 1
        assert throttled.json()["error"] == "temporarily_unavailable"
        assert throttled.headers["content-type"].startswith("application/json")
        # Every request from the address counts: 4 + 5 so far, 3 more pass the address limit.
        other = service.register("other", "clinic")
        assert [service.request_token(other).status_code for _ in range(4)] == [200, 200, 200, 429]
        assert (
            service.request_token(other).json()["error_description"] == "too many token requests; retry later"
        )
    contents = audit_contents(database_url)
    issued = [c for c in contents if c["type"] == "login" and c["outcome"] == "0"]
    assert len(issued) == 6
    counted = [c for c in contents if c["type"] == "login" and "aggregate" in c]
    assert sum(c["aggregate"]["count"] for c in counted) == 4 + 2 + 2  # bad assertions, throttled
    assert all("client" not in c["agent"] for c in counted)


@pytest.mark.parametrize("status", [400, 404])
def test_a_refusal_built_by_its_route_is_written_once(database_url: str, tmp_path: Path, status: int) -> None:
    """A refusal that carries its own entry (a 404 with its consent decision) is not written twice."""
    with Service.start(database_url, tmp_path) as service:
        authority = service.register("authority", "authority", purposes=("PUBHLTH",))
        headers = service.headers(authority, purpose_of_use="PUBHLTH")
        path = "/fhir/Observation/does-not-exist" if status == 404 else "/fhir/Observation?_count=-1"
        response = service.client.get(path, headers=headers)
        assert response.status_code == status
        found = entries_of(database_url, response)
        assert len(found) == 1
        assert found[0]["agent"]["client"] == authority.client_id


def test_flusher_writes_finished_minutes_while_running_and_the_rest_at_shutdown() -> None:
    now = [datetime(2026, 12, 1, 10, 0, 5, tzinfo=UTC)]
    tally = RefusalTally(clock=lambda: now[0])
    written: list[list[Any]] = []

    async def write(records: list[Any]) -> None:
        written.append(records)

    async def scenario() -> None:
        task = asyncio.create_task(run_flusher(tally, write, interval=0.01))
        tally.add(RefusalKey(None, "203.0.113.9", "/fhir/{resource_type}", "GET", 401, "no token"))
        await asyncio.sleep(0.05)
        assert written == []  # its minute is not over
        now[0] += timedelta(minutes=1)
        tally.add(RefusalKey(None, "203.0.113.9", "/fhir/{resource_type}", "GET", 401, "no token"))
        await asyncio.sleep(0.05)
        assert [len(batch) for batch in written] == [1]  # the finished minute, the new one waits
        await stop_flusher(task)
        assert [len(batch) for batch in written] == [1, 1]  # shutdown writes the current minute

    asyncio.run(scenario())

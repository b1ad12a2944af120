"""Subscriptions (R5 Backport IG 1.1.0 for R4): an authority's own Subscriptions, the events that
writes publish to them, $status and $events with consent decided again, and withdrawal notices."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from mhr_testkit import EXAMPLES, FHIR_HEADERS, Party, Service, load_example, submit, sync_url
from test_disclosure import World, consent, make_world

from service.domain.errors import Unprocessable
from service.http.errors import fhir_error
from service.jobs.kinds import JobKind, load_kinds, register
from service.subscriptions.backport import (
    HEARTBEAT_PERIOD,
    MAX_COUNT,
    NOTIFICATION_PROFILE,
    PAYLOAD_CONTENT,
    STATUS_PROFILE,
    SUBSCRIPTION_PROFILE,
    TIMEOUT,
)
from service.subscriptions.headers import open_headers
from service.subscriptions.outbox import DELIVERY_KIND, DeliveryPayload
from service.subscriptions.resource import parse_subscription
from service.subscriptions.topics import Topic

RECORDS = Topic.record_visible.value
WITHDRAWALS = Topic.consent_withdrawn.value
SECRET = "Authorization: Bearer receiver-secret-7f3a"


async def _count_deliveries(job: Any, session: Any) -> None:
    """Stands in for the delivery worker's handler where that kind is not installed: these tests
    look only at the jobs that publishing queues (no worker runs them: job_workers=0)."""


# The installed kinds first (load_kinds imports them): the stand-in only where there is none.
if DELIVERY_KIND not in load_kinds().names():
    register(JobKind(DELIVERY_KIND, DeliveryPayload, run=_count_deliveries))


def subscription(
    topic: str = RECORDS,
    *,
    endpoint: str = "https://receiver.example.org/hook",
    content: str = "id-only",
    headers: list[str] | None = None,
    status: str = "requested",
    **changes: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Subscription",
        "meta": {"profile": [SUBSCRIPTION_PROFILE]},
        "status": status,
        "reason": "arrivals for the county health department",
        "criteria": topic,
        "channel": {
            "extension": [
                {"url": HEARTBEAT_PERIOD, "valueUnsignedInt": 3600},
                {"url": TIMEOUT, "valueUnsignedInt": 30},
                {"url": MAX_COUNT, "valuePositiveInt": 20},
            ],
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "_payload": {"extension": [{"url": PAYLOAD_CONTENT, "valueCode": content}]},
            "header": [SECRET] if headers is None else headers,
        },
    }
    body.update(changes)
    return body


@pytest.fixture
def service(database_url: str, tmp_path: Path) -> Iterator[Service]:
    with Service.start(database_url, tmp_path, job_workers=0) as running:
        yield running


def _auth(service: Service, party: Party, purpose: str = "PUBHLTH") -> dict[str, str]:
    return {
        **FHIR_HEADERS,
        **service.headers(party, "system/*.rs system/Subscription.cruds", purpose_of_use=purpose),
    }


def _create(service: Service, party: Party, body: dict[str, Any], purpose: str = "PUBHLTH") -> Any:
    return service.client.post(
        "/fhir/Subscription", content=json.dumps(body), headers=_auth(service, party, purpose)
    )


def _subscribe(service: Service, party: Party, topic: str = RECORDS, **kwargs: Any) -> str:
    response = _create(service, party, subscription(topic, **kwargs))
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _sql(service: Service, statement: str, **params: Any) -> list[Any]:
    engine = sa.create_engine(sync_url(service.settings.database_url))
    try:
        with engine.connect() as connection:
            return list(connection.execute(sa.text(statement), params))
    finally:
        engine.dispose()


def _events(service: Service, party: Party, subscription_id: str, **params: str) -> Any:
    return service.client.get(
        f"/fhir/Subscription/{subscription_id}/$events", params=params, headers=_auth(service, party)
    )


def _status_parameters(bundle: dict[str, Any]) -> dict[str, Any]:
    status = bundle["entry"][0]["resource"]
    assert status["resourceType"] == "Parameters"
    assert status["meta"]["profile"] == [STATUS_PROFILE]
    found: dict[str, Any] = {"notification-event": []}
    for p in status["parameter"]:
        if p["name"] == "notification-event":
            found["notification-event"].append(
                {q["name"]: next(v for k, v in q.items() if k != "name") for q in p["part"]}
            )
        else:
            found[p["name"]] = next(v for k, v in p.items() if k != "name")
    return found


def _focuses(bundle: dict[str, Any]) -> list[str]:
    return [e["focus"]["reference"] for e in _status_parameters(bundle)["notification-event"] if "focus" in e]


# --- the resource -------------------------------------------------------------------------


def test_an_authority_creates_reads_searches_updates_and_deletes_its_subscription(service: Service) -> None:
    authority = service.register("authority", "authority", purposes=("PUBHLTH",))
    created = _create(service, authority, subscription())
    assert created.status_code == 201, created.text
    body = created.json()
    sid = body["id"]
    assert created.headers["location"].endswith(f"/fhir/Subscription/{sid}/_history/1")
    assert body["status"] == "requested"  # active only once the handshake succeeds
    assert body["criteria"] == RECORDS
    assert body["meta"]["profile"] == [SUBSCRIPTION_PROFILE]
    assert body["channel"]["header"] == ["Authorization: ***"]  # the secret is never answered back
    assert "receiver-secret" not in created.text
    # Stored sealed: not in the row in clear, but it opens to what the authority sent.
    (row,) = _sql(service, "SELECT headers_sealed FROM subscriptions WHERE id = :id", id=sid)
    assert b"receiver-secret" not in bytes(row.headers_sealed)
    keys = service.fastapi.state.runtime.keys  # type: ignore[attr-defined]
    assert open_headers(keys, sid, bytes(row.headers_sealed)) == [SECRET]

    read = service.client.get(f"/fhir/Subscription/{sid}", headers=_auth(service, authority))
    assert (
        read.status_code == 200 and read.json()["channel"]["endpoint"] == "https://receiver.example.org/hook"
    )
    found = service.client.get(
        "/fhir/Subscription", params={"status": "requested"}, headers=_auth(service, authority)
    )
    assert found.status_code == 200 and found.json()["total"] == 1
    assert found.json()["entry"][0]["resource"]["id"] == sid
    none = service.client.get(
        "/fhir/Subscription", params={"status": "off"}, headers=_auth(service, authority)
    )
    assert none.json()["total"] == 0

    # Read-modify-write: the masked header keeps its stored value; status off turns it off.
    changed = read.json()
    changed["status"] = "off"
    changed["channel"]["header"].append("X-Receiver: county-7")
    updated = service.client.put(
        f"/fhir/Subscription/{sid}", content=json.dumps(changed), headers=_auth(service, authority)
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["status"] == "off" and updated.json()["meta"]["versionId"] == "2"
    (row,) = _sql(service, "SELECT headers_sealed FROM subscriptions WHERE id = :id", id=sid)
    assert open_headers(keys, sid, bytes(row.headers_sealed)) == [SECRET, "X-Receiver: county-7"]

    deleted = service.client.delete(f"/fhir/Subscription/{sid}", headers=_auth(service, authority))
    assert deleted.status_code == 204
    gone = service.client.get(f"/fhir/Subscription/{sid}", headers=_auth(service, authority))
    assert gone.status_code == 404 and gone.json()["resourceType"] == "OperationOutcome"


def test_another_authoritys_subscription_is_not_found(service: Service) -> None:
    owner = service.register("owner", "authority", purposes=("PUBHLTH",))
    stranger = service.register("stranger", "authority", purposes=("PUBHLTH",))
    sid = _subscribe(service, owner)
    headers = _auth(service, stranger)
    for method, path in (
        ("GET", f"/fhir/Subscription/{sid}"),
        ("DELETE", f"/fhir/Subscription/{sid}"),
        ("GET", f"/fhir/Subscription/{sid}/$status"),
        ("GET", f"/fhir/Subscription/{sid}/$events"),
    ):
        response = service.client.request(method, path, headers=headers)
        assert response.status_code == 404, (method, path, response.text)
    put = service.client.put(
        f"/fhir/Subscription/{sid}", content=json.dumps({**subscription(), "id": sid}), headers=headers
    )
    assert put.status_code == 404
    assert service.client.get("/fhir/Subscription", headers=headers).json()["total"] == 0
    # The owner's subscription is untouched.
    assert service.client.get(f"/fhir/Subscription/{sid}", headers=_auth(service, owner)).status_code == 200


@pytest.mark.parametrize("kind", ["clinic", "auditor"])
def test_clinics_and_auditors_cannot_subscribe(service: Service, kind: str) -> None:
    party = service.register(kind, kind)
    response = service.client.post(
        "/fhir/Subscription",
        content=json.dumps(subscription()),
        headers={**FHIR_HEADERS, **service.headers(party)},
    )
    assert response.status_code == 403
    assert response.json()["issue"][0]["code"] == "forbidden"
    assert _sql(service, "SELECT count(*) AS n FROM subscriptions")[0].n == 0


REFUSALS: dict[str, tuple[Any, int, str]] = {
    "full-resource": (subscription(content="full-resource"), 422, "full-resource is not offered"),
    "no payload content": (subscription(content="bogus-content"), 422, "id-only or empty"),
    "unknown topic": (subscription("https://mhr.example.org/fhir/SubscriptionTopic/nope"), 422, "topics"),
    "websocket": (
        {**subscription(), "channel": {**subscription()["channel"], "type": "websocket"}},
        422,
        "rest-hook",
    ),
    "credentials in URL": (
        subscription(endpoint="https://user:pw@receiver.example.org/"),
        422,
        "credentials",
    ),
    "header on two lines": (subscription(headers=["X-A: 1\r\nX-B: 2"]), 422, "one line"),
    "header without name": (subscription(headers=["no colon here"]), 422, "Name: value"),
    "no reason": ({k: v for k, v in subscription().items() if k != "reason"}, 400, ""),
    "not FHIR": (subscription(status="bogus"), 400, ""),
    "not a Subscription": ({"resourceType": "Patient"}, 400, "Subscription"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_are_operation_outcomes_and_store_nothing(service: Service, case: str) -> None:
    authority = service.register("authority", "authority", purposes=("PUBHLTH",))
    body, status, says = REFUSALS[case]
    response = _create(service, authority, body)
    assert response.status_code == status, response.text
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert says in json.dumps(outcome)
    assert "receiver-secret" not in response.text
    assert _sql(service, "SELECT count(*) AS n FROM subscriptions")[0].n == 0


def test_malformed_json_is_a_400(service: Service) -> None:
    authority = service.register("authority", "authority", purposes=("PUBHLTH",))
    response = service.client.post(
        "/fhir/Subscription", content=b"{not json", headers=_auth(service, authority)
    )
    assert response.status_code == 400 and response.json()["resourceType"] == "OperationOutcome"


def test_an_http_endpoint_is_refused_outside_development() -> None:
    with pytest.raises(Unprocessable) as refused:
        parse_subscription(subscription(endpoint="http://receiver.example.org/hook"), allow_http=False)
    answer = fhir_error(refused.value)  # what the one error module makes of it: a 422
    assert answer.status == 422
    assert "https" in answer.issues[0].diagnostics
    allowed = parse_subscription(subscription(endpoint="https://receiver.example.org/hook"), allow_http=False)
    assert allowed.endpoint == "https://receiver.example.org/hook"
    # Development (and the tests' settings) accept a local http receiver.
    assert parse_subscription(subscription(endpoint="http://127.0.0.1:9/hook"), allow_http=True).endpoint


def test_the_topic_of_a_subscription_cannot_change(service: Service) -> None:
    authority = service.register("authority", "authority", purposes=("PUBHLTH",))
    sid = _subscribe(service, authority)
    moved = {**subscription(WITHDRAWALS), "id": sid}
    response = service.client.put(
        f"/fhir/Subscription/{sid}", content=json.dumps(moved), headers=_auth(service, authority)
    )
    assert response.status_code == 422 and "topic" in response.text


# --- events ---------------------------------------------------------------------------------


def _exam_with_consent(service: Service, clinic: Party, authority: Party) -> dict[str, Any]:
    """Example exam 0 with its consent naming ``authority`` (for PUBHLTH)."""
    bundle = load_example(EXAMPLES[1])
    bundle.pop("identifier", None)
    patient_url = next(e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    granted = consent("PLACEHOLDER", authority.organization_id)
    granted["patient"] = {"reference": patient_url}
    bundle["entry"].append(
        {
            "fullUrl": "urn:uuid:0c0e0000-0000-4000-8000-00000000c005",
            "resource": granted,
            "request": {"method": "POST", "url": "Consent"},
        }
    )
    return bundle


def test_an_exam_publishes_record_visible_events_to_the_authorities_its_consent_admits(
    service: Service,
) -> None:
    clinic = service.register("clinic", "clinic")
    admitted = service.register("admitted", "authority", purposes=("PUBHLTH",))
    excluded = service.register("excluded", "authority", purposes=("PUBHLTH",))
    mine = _subscribe(service, admitted)
    theirs = _subscribe(service, excluded)
    reply = submit(service, clinic, _exam_with_consent(service, clinic, admitted))
    assert reply.status_code == 200, reply.text
    written = {"/".join(e["response"]["location"].split("/")[:4]) for e in reply.json()["entry"]}

    events = _events(service, admitted, mine)
    assert events.status_code == 200, events.text
    bundle = events.json()
    assert bundle["type"] == "history" and bundle["meta"]["profile"] == [NOTIFICATION_PROFILE]
    status = _status_parameters(bundle)
    assert status["type"] == "query-event" and status["topic"] == RECORDS
    numbers = [int(e["event-number"]) for e in status["notification-event"]]
    assert numbers == list(range(1, len(numbers) + 1)) and numbers
    assert status["events-since-subscription-start"] == str(len(numbers))
    base = service.settings.fhir_base_url
    focuses = {f.removeprefix(base + "/") for f in _focuses(bundle)}
    assert focuses <= written and any(f.startswith("Patient/") for f in focuses)
    assert not any(f.startswith("Provenance/") for f in focuses)
    # The authority the consent does not name hears nothing.
    assert (
        _status_parameters(_events(service, excluded, theirs).json())["events-since-subscription-start"]
        == "0"
    )
    # One delivery job per subscription and transaction, carrying the subscription's id only.
    jobs = _sql(service, "SELECT payload, idempotency_key FROM jobs WHERE kind = :k", k=DELIVERY_KIND)
    payloads = [json.loads(j.payload) if isinstance(j.payload, str) else j.payload for j in jobs]
    assert {"subscription_id": mine} in payloads
    # Queued by the exam's transaction (one key per publishing transaction), besides the handshake's.
    keys = [j.idempotency_key for j in jobs]
    assert len([k for k in keys if k.startswith(f"{mine}:publish:")]) == 1, keys


def test_events_carry_ids_only(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    authority = service.register("authority", "authority", purposes=("PUBHLTH",))
    sid = _subscribe(service, authority, content="empty")
    bundle = _exam_with_consent(service, clinic, authority)
    assert submit(service, clinic, bundle).status_code == 200
    answer = _events(service, authority, sid)
    status = _status_parameters(answer.json())
    assert status["notification-event"] and not _focuses(answer.json())  # empty: numbers and times only
    id_only = _events(service, authority, sid, content="id-only").json()
    assert _focuses(id_only)
    assert len(id_only["entry"]) == 1  # no resource content, ever
    patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    family = patient["name"][0]["family"]
    assert family not in json.dumps(id_only)
    columns = _sql(service, "SELECT * FROM subscription_events")
    assert columns and family not in repr(columns)
    full = _events(service, authority, sid, content="full-resource")
    assert full.status_code == 400


def test_a_new_consent_publishes_the_records_it_admits(world_service: World) -> None:
    w = world_service
    sid = _subscribe(w.service, w.authority)
    assert (
        _status_parameters(_events(w.service, w.authority, sid).json())["events-since-subscription-start"]
        == "0"
    )
    w.post_consent(consent(w.patient, w.authority.organization_id))
    focuses = _focuses(_events(w.service, w.authority, sid).json())
    base = w.service.settings.fhir_base_url
    assert f"{base}/Patient/{w.patient}/_history/1" in focuses
    assert f"{base}/Observation/{w.observation}/_history/1" in focuses


def test_events_recheck_consent_and_keep_their_numbers(world_service: World) -> None:
    w = world_service
    sid = _subscribe(w.service, w.authority)
    consent_id = w.post_consent(consent(w.patient, w.authority.organization_id))
    before = _status_parameters(_events(w.service, w.authority, sid).json())
    assert before["notification-event"]
    w.withdraw(consent_id)
    after = _status_parameters(_events(w.service, w.authority, sid).json())
    assert after["notification-event"] == []  # nothing it may no longer see is named
    assert after["events-since-subscription-start"] == before["events-since-subscription-start"]
    status = w.service.client.get(f"/fhir/Subscription/{sid}/$status", headers=_auth(w.service, w.authority))
    assert status.status_code == 200
    bundle = status.json()
    assert bundle["type"] == "searchset" and bundle["total"] == 1
    parameters = _status_parameters(bundle)
    assert parameters["type"] == "query-status" and parameters["status"] == "requested"
    assert parameters["events-since-subscription-start"] == before["events-since-subscription-start"]


def test_events_range_parameters(world_service: World) -> None:
    w = world_service
    sid = _subscribe(w.service, w.authority)
    w.post_consent(consent(w.patient, w.authority.organization_id))
    total = int(
        _status_parameters(_events(w.service, w.authority, sid).json())["events-since-subscription-start"]
    )
    assert total >= 3
    window = _status_parameters(
        _events(w.service, w.authority, sid, eventsSinceNumber="2", eventsUntilNumber="3").json()
    )
    assert [e["event-number"] for e in window["notification-event"]] == ["2", "3"]
    for bad in ({"eventsSinceNumber": "0"}, {"eventsSinceNumber": "x"}, {"unknown": "1"}):
        assert _events(w.service, w.authority, sid, **bad).status_code == 400


@pytest.fixture
def world_service(service: Service) -> World:
    return make_world(service)


# --- withdrawal notices ---------------------------------------------------------------------


def _disclosures(w: World) -> list[dict[str, Any]]:
    response = w.service.client.get(
        f"/fhir/Patient/{w.patient}/$disclosures", headers=w.service.headers(w.clinic)
    )
    assert response.status_code == 200, response.text
    listed = []
    for p in response.json().get("parameter", []):
        parts: dict[str, Any] = {}
        for part in p["part"]:
            parts.setdefault(part["name"], []).append(next(v for k, v in part.items() if k != "name"))
        listed.append(parts)
    return listed


def test_a_withdrawal_is_told_to_the_authorities_that_received_data_and_only_them(
    world_service: World,
) -> None:
    w = world_service
    third = w.service.register("authority C", "authority", purposes=("PUBHLTH",))
    received = _subscribe(w.service, w.authority, WITHDRAWALS)
    never_read = _subscribe(w.service, third, WITHDRAWALS)
    uninvolved = _subscribe(w.service, w.other, WITHDRAWALS)
    first = w.post_consent(consent(w.patient, w.authority.organization_id))
    second = w.post_consent(consent(w.patient, third.organization_id))
    # Authority A reads the record (a disclosure under the first consent); C never does.
    read = w.service.client.get(
        f"/fhir/Patient/{w.patient}", headers=w.service.headers(w.authority, purpose_of_use="PUBHLTH")
    )
    assert read.status_code == 200
    w.withdraw(first)
    w.withdraw(second)

    told = _status_parameters(_events(w.service, w.authority, received).json())
    assert [e["focus"]["reference"] for e in told["notification-event"]] == [
        f"{w.service.settings.fhir_base_url}/Consent/{first}/_history/2"
    ]
    for party, sid in ((third, never_read), (w.other, uninvolved)):
        assert (
            _status_parameters(_events(w.service, party, sid).json())["events-since-subscription-start"]
            == "0"
        )
    notices = [d for d in _disclosures(w) if "notice" in d]
    assert len(notices) == 1
    assert notices[0]["notice"] == ["withdrawal-notice.notified"]
    assert notices[0]["recipient"][0]["reference"] == f"Organization/{w.authority.organization_id}"
    assert notices[0]["consent"][0]["reference"] == f"Consent/{first}/_history/2"


def test_an_authority_without_a_subscription_is_on_the_accounting_as_not_notified(
    world_service: World,
) -> None:
    w = world_service
    consent_id = w.post_consent(consent(w.patient, w.authority.organization_id))
    read = w.service.client.get(
        f"/fhir/Patient/{w.patient}", headers=w.service.headers(w.authority, purpose_of_use="PUBHLTH")
    )
    assert read.status_code == 200
    w.withdraw(consent_id)
    notices = [d for d in _disclosures(w) if "notice" in d]
    assert [n["notice"] for n in notices] == [["withdrawal-notice.no-subscription"]]
    assert _sql(w.service, "SELECT count(*) AS n FROM subscription_events")[0].n == 0


def _replace_consent(w: World, consent_id: str, body: dict[str, Any]) -> None:
    response = w.service.client.put(
        f"/fhir/Consent/{consent_id}",
        content=json.dumps({**body, "id": consent_id}),
        headers={**FHIR_HEADERS, **w.service.headers(w.clinic)},
    )
    assert response.status_code == 200, response.text


def test_a_narrowed_consent_is_a_withdrawal_notice_too(world_service: World) -> None:
    w = world_service
    sid = _subscribe(w.service, w.authority, WITHDRAWALS)
    consent_id = w.post_consent(consent(w.patient, w.authority.organization_id))
    read = w.service.client.get(
        f"/fhir/Observation/{w.observation}", headers=w.service.headers(w.authority, purpose_of_use="PUBHLTH")
    )
    assert read.status_code == 200
    # The migrant now shares vaccinations only: the Observations it admitted are no longer visible.
    _replace_consent(
        w, consent_id, consent(w.patient, w.authority.organization_id, classes=("Immunization",))
    )
    told = _status_parameters(_events(w.service, w.authority, sid).json())
    assert [e["focus"]["reference"] for e in told["notification-event"]] == [
        f"{w.service.settings.fhir_base_url}/Consent/{consent_id}/_history/2"
    ]
    # Widening it again is no withdrawal: nothing more is told.
    _replace_consent(w, consent_id, consent(w.patient, w.authority.organization_id))
    again = _status_parameters(_events(w.service, w.authority, sid).json())
    assert again["events-since-subscription-start"] == "1"


def test_a_correction_publishes_its_new_version(world_service: World) -> None:
    w = world_service
    w.post_consent(consent(w.patient, w.authority.organization_id))
    sid = _subscribe(w.service, w.authority)
    headers = {**FHIR_HEADERS, **w.service.headers(w.clinic)}
    current = w.service.client.get(f"/fhir/Observation/{w.observation}", headers=headers).json()
    current["status"] = "amended"
    put = w.service.client.put(
        f"/fhir/Observation/{w.observation}", content=json.dumps(current), headers=headers
    )
    assert put.status_code == 200, put.text
    focuses = _focuses(_events(w.service, w.authority, sid).json())
    assert focuses == [f"{w.service.settings.fhir_base_url}/Observation/{w.observation}/_history/2"]
    # The other authority, whom no consent names, is told nothing.
    other = _subscribe(w.service, w.other)
    assert (
        submit(w.service, w.clinic, _exam_with_consent(w.service, w.clinic, w.authority)).status_code == 200
    )
    assert (
        _status_parameters(_events(w.service, w.other, other).json())["events-since-subscription-start"]
        == "0"
    )


def test_a_subscription_that_is_off_or_ended_records_nothing(world_service: World) -> None:
    w = world_service
    off = _subscribe(w.service, w.authority, status="off")
    ended = _subscribe(w.service, w.authority, end="2020-01-01T00:00:00Z")
    w.post_consent(consent(w.patient, w.authority.organization_id))
    for sid in (off, ended):
        assert (
            _status_parameters(_events(w.service, w.authority, sid).json())["events-since-subscription-start"]
            == "0"
        )


def test_concurrent_writers_number_a_subscriptions_events_without_gaps_or_repeats(service: Service) -> None:
    from service.store.database import Database
    from service.subscriptions.events import Event, Focus, publish

    authority = service.register("authority", "authority", purposes=("PUBHLTH",))
    sid = _subscribe(service, authority)

    async def writer(database: Database, n: int) -> None:
        async with database.transaction() as session:
            await publish(
                session,
                [
                    Event(
                        Topic.record_visible,
                        authority.organization_id,
                        Focus("Observation", f"o{n}-{k}", 1),
                        purpose="PUBHLTH",
                    )
                    for k in range(3)
                ],
            )

    async def run() -> None:
        database = Database(service.settings.database_url)
        try:
            await asyncio.gather(*(writer(database, n) for n in range(6)))
        finally:
            await database.dispose()

    asyncio.run(run())
    numbers = [
        r.event_number
        for r in _sql(
            service,
            "SELECT event_number FROM subscription_events WHERE subscription_id = :s ORDER BY event_number",
            s=sid,
        )
    ]
    assert numbers == list(range(1, 19))
    assert (
        _sql(service, "SELECT events_issued FROM subscriptions WHERE id = :s", s=sid)[0].events_issued == 18
    )
    # Each writer's three events are consecutive: numbers follow commit order, one transaction at a time.
    rows = _sql(
        service,
        "SELECT event_number, focus_id FROM subscription_events"
        " WHERE subscription_id = :s ORDER BY event_number",
        s=sid,
    )
    for start in range(0, 18, 3):
        assert len({r.focus_id.split("-")[0] for r in rows[start : start + 3]}) == 1


def test_task_topics_are_published_to_the_task_owner(service: Service) -> None:
    from service.store.database import Database
    from service.subscriptions.events import Event, Focus, publish

    owner = service.register("owner", "authority", purposes=("PUBHLTH",))
    bystander = service.register("bystander", "authority", purposes=("PUBHLTH",))
    assigned = _subscribe(service, owner, Topic.task_assigned.value)
    overdue = _subscribe(service, owner, Topic.task_overdue.value)
    elsewhere = _subscribe(service, bystander, Topic.task_assigned.value)

    async def run() -> None:
        database = Database(service.settings.database_url)
        try:
            async with database.transaction() as session:
                published = await publish(
                    session, [Event(Topic.task_assigned, owner.organization_id, Focus("Task", "t1", 1))]
                )
                assert [(p.subscription_id, p.event_number) for p in published] == [(assigned, 1)]
        finally:
            await database.dispose()

    asyncio.run(run())
    # Numbered for the owner only. Whether the Task is shown is decided by who owns it now
    # (tests/api/test_task_notifications.py): "t1" is nobody's task, so it is not.
    owner_status = _status_parameters(_events(service, owner, assigned).json())
    assert owner_status["events-since-subscription-start"] == "1"
    assert _focuses(_events(service, owner, assigned).json()) == []
    for party, sid in ((owner, overdue), (bystander, elsewhere)):
        assert (
            _status_parameters(_events(service, party, sid).json())["events-since-subscription-start"] == "0"
        )


def _snapshot_statements(w: World, write: Any) -> int:
    """How many times the write ran the admissions snapshot (alias ``grant_admits``)."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    engine = w.service.fastapi.state.runtime.database.engine.sync_engine  # type: ignore[attr-defined]
    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        write()
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
    return sum("grant_admits" in s for s in seen)


def test_a_consent_concerning_no_subscriber_and_no_recipient_skips_the_snapshot(world_service: World) -> None:
    w = world_service
    # Nobody subscribes and nothing about the migrant was disclosed: no snapshot, no events.
    first = _snapshot_statements(w, lambda: w.post_consent(consent(w.patient, w.authority.organization_id)))
    assert first == 0
    assert _sql(w.service, "SELECT count(*) AS n FROM subscription_events")[0].n == 0
    # Once the authority read a record, a withdrawal is owed a notice: the snapshot is taken.
    consent_id = w.post_consent(consent(w.patient, w.other.organization_id))
    read = w.service.client.get(
        f"/fhir/Patient/{w.patient}", headers=w.service.headers(w.other, purpose_of_use="PUBHLTH")
    )
    assert read.status_code == 200
    assert _snapshot_statements(w, lambda: w.withdraw(consent_id)) == 2
    notices = [d for d in _disclosures(w) if "notice" in d]
    assert [n["notice"] for n in notices] == [["withdrawal-notice.no-subscription"]]


def test_a_record_subscriber_makes_every_consent_change_take_the_snapshot(world_service: World) -> None:
    w = world_service
    sid = _subscribe(w.service, w.authority, RECORDS)
    taken = _snapshot_statements(w, lambda: w.post_consent(consent(w.patient, w.authority.organization_id)))
    assert taken == 2  # before and after the grants change
    events = _sql(
        w.service, "SELECT count(*) AS n FROM subscription_events WHERE subscription_id = :s", s=sid
    )
    assert events[0].n >= 2  # the older versions the consent admitted

"""Rest-hook delivery (service.subscriptions.delivery) to a real HTTP receiver, on both databases.

What an authority relies on: the handshake activates its subscription; every event reaches it
once, in order of event number, even when its receiver was down for a while; an event about a
record it may no longer see is never sent; after the retry period the subscription is ``error``
and what it missed is still in ``$events``; every push is on the audit trail; its channel
header (a secret) goes to its endpoint and nowhere else.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from mhr_testkit import FHIR_HEADERS, REPO, Service, sync_url
from subscription_receiver import Receiver, receiver
from test_disclosure import World, consent, make_world

from service.jobs.kinds import load_kinds
from service.jobs.worker import Worker
from service.records.relabel import RelabelCounts, relabel
from service.runtime.providers import build_runtime, close_runtime
from service.store.database import Database
from service.subscriptions.heartbeat import HEARTBEAT_KIND
from service.subscriptions.topics import Topic

SECRET_HEADER = "Authorization: Bearer receiver-secret-0123456789"
IG = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
FAST_RETRIES = {
    "job_workers": 0,  # the tests run the worker themselves, one job at a time
    "subscription_retry_base_seconds": 0.05,
    "subscription_retry_cap_seconds": 0.2,
    "subscription_timeout_seconds": 5.0,
}


@pytest.fixture
def hook() -> Iterator[Receiver]:
    with receiver() as started:
        yield started


def subscription(endpoint: str, *, heartbeat: int | None = None, content: str = "id-only") -> dict[str, Any]:
    channel: dict[str, Any] = {
        "type": "rest-hook",
        "endpoint": endpoint,
        "payload": "application/fhir+json",
        "_payload": {"extension": [{"url": IG + "backport-payload-content", "valueCode": content}]},
        "header": [SECRET_HEADER],
    }
    if heartbeat is not None:
        channel["extension"] = [{"url": IG + "backport-heartbeat-period", "valueUnsignedInt": heartbeat}]
    return {
        "resourceType": "Subscription",
        "meta": {"profile": [IG + "backport-subscription"]},
        "status": "requested",
        "reason": "arrivals for follow-up",
        "criteria": Topic.record_visible.value,
        "channel": channel,
    }


def subscribe(world: World, endpoint: str, **kwargs: Any) -> str:
    response = world.service.client.post(
        "/fhir/Subscription",
        content=json.dumps(subscription(endpoint, **kwargs)),
        headers={**FHIR_HEADERS, **world.service.headers(world.authority, purpose_of_use="PUBHLTH")},
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def row(service: Service, subscription_id: str) -> dict[str, Any]:
    engine = sa.create_engine(sync_url(service.settings.database_url))
    try:
        with engine.connect() as conn:
            found = conn.execute(
                sa.text(
                    "SELECT status, events_issued, events_delivered, error FROM subscriptions WHERE id = :id"
                ),
                {"id": subscription_id},
            ).one()
    finally:
        engine.dispose()
    return dict(found._mapping)


def run_jobs(
    service: Service,
    *,
    until: Any,
    seconds: float = 60,
    what: str = "delivery",
    statements: list[str] | None = None,
) -> None:
    """Run the job worker (delivery, retries, heartbeats) until ``until()`` holds; with
    ``statements``, the SQL the worker executes is appended to it."""

    async def drive() -> None:
        runtime = build_runtime(service.settings)
        if statements is not None:

            def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
                statements.append(statement)

            sa.event.listen(runtime.database.engine.sync_engine, "before_cursor_execute", seen)
        try:
            worker = Worker(runtime, load_kinds(), name="test-delivery")
            deadline = time.monotonic() + seconds
            while not until():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                if not await worker.run_one():
                    await asyncio.sleep(0.05)
        finally:
            await close_runtime(runtime)

    asyncio.run(drive())


def audit_outcomes(service: Service) -> list[tuple[str, str]]:
    engine = sa.create_engine(sync_url(service.settings.database_url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT subtype, outcome FROM audit_entries"
                    " WHERE subtype LIKE 'subscription-%' ORDER BY id"
                )
            ).all()
    finally:
        engine.dispose()
    return [(str(s), str(o)) for s, o in rows]


def audit_details(service: Service, subtype: str) -> list[str]:
    """The ``detail`` of each audit entry of ``subtype``, in order (from the entry's content)."""
    engine = sa.create_engine(sync_url(service.settings.database_url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT content FROM audit_entries WHERE subtype = :s ORDER BY id"), {"s": subtype}
            ).all()
    finally:
        engine.dispose()
    return [str(json.loads(bytes(c))["detail"]) for (c,) in rows]


def delivered_event_numbers(service: Service) -> list[int]:
    """Event numbers whose notification's outcome entry says delivered."""
    numbers: list[int] = []
    for detail in audit_details(service, "subscription-notification-outcome"):
        span, _, outcome = detail.rpartition(":")
        if outcome == "delivered":
            first, last = span.removeprefix("events-").split("(")[0].split("..")
            numbers.extend(range(int(first), int(last) + 1))
    return numbers


@pytest.fixture
def fast(database_url: str, tmp_path: Any) -> Iterator[Service]:
    with Service.start(database_url, tmp_path, **FAST_RETRIES) as running:
        yield running


def active_subscription(world: World, hook: Receiver, **kwargs: Any) -> str:
    subscription_id = subscribe(world, hook.url, **kwargs)
    run_jobs(world.service, until=lambda: row(world.service, subscription_id)["status"] != "requested")
    assert row(world.service, subscription_id)["status"] == "active"
    handshakes = hook.notifications("handshake")
    assert len(handshakes) == 1 and handshakes[0].headers["authorization"] == SECRET_HEADER.split(": ", 1)[1]
    return subscription_id


def test_the_handshake_activates_and_a_failed_handshake_is_error(fast: Service, hook: Receiver) -> None:
    world = make_world(fast)
    active_subscription(world, hook)
    hook.answer_status = 500
    refused = subscribe(world, hook.url)
    run_jobs(fast, until=lambda: row(fast, refused)["status"] != "requested")
    assert row(fast, refused)["status"] == "error"
    assert "handshake failed (http-500)" in row(fast, refused)["error"]
    assert audit_outcomes(fast) == [("subscription-handshake", "0"), ("subscription-handshake", "8")]


def test_a_receiver_down_for_a_while_gets_every_event_once_in_order(fast: Service, hook: Receiver) -> None:
    world = make_world(fast)
    subscription_id = active_subscription(world, hook)
    hook.down()
    world.post_consent(consent(world.patient, world.authority.organization_id))
    issued = row(fast, subscription_id)["events_issued"]
    assert issued >= 2
    # Several attempts fail while it is down (each one a retry job of its own).
    failures = lambda: sum(1 for s, o in audit_outcomes(fast) if o == "8")  # noqa: E731
    run_jobs(fast, until=lambda: failures() >= 3, what="three failed attempts")
    assert row(fast, subscription_id)["events_delivered"] == 0
    hook.up()
    run_jobs(fast, until=lambda: row(fast, subscription_id)["events_delivered"] == issued)
    assert hook.event_numbers() == list(range(1, issued + 1))  # once each, in order
    for notification in hook.notifications():
        assert notification.headers["authorization"] == SECRET_HEADER.split(": ", 1)[1]
        assert notification.bundle["type"] == "history"
        assert notification.parameter("status")["valueCode"] == "active"
    # What a notification names, the authority can fetch with its own token.
    focus = hook.notifications()[0].focus_references[0]
    fetched = fast.client.get(
        focus.removeprefix("http://testserver"),
        headers=fast.headers(world.authority, purpose_of_use="PUBHLTH"),
    )
    assert fetched.status_code == 200, fetched.text
    entries = audit_outcomes(fast)
    # One disclosure entry per event per attempt (committed before each POST), and an outcome
    # entry per notification: failures while down, then deliveries that carried every event.
    assert sum(1 for s, _ in entries if s == "subscription-notification") >= 4  # one per attempt here
    outcomes = [o for s, o in entries if s == "subscription-notification-outcome"]
    assert outcomes.count("8") >= 3 and outcomes[-1] == "0"
    assert delivered_event_numbers(fast) == list(range(1, issued + 1))


def test_consent_is_decided_again_with_one_grant_query_per_notification(
    fast: Service, hook: Receiver
) -> None:
    world = make_world(fast)
    subscription_id = active_subscription(world, hook)
    world.post_consent(consent(world.patient, world.authority.organization_id))
    issued = row(fast, subscription_id)["events_issued"]
    assert issued >= 3
    statements: list[str] = []
    run_jobs(
        fast, until=lambda: row(fast, subscription_id)["events_delivered"] == issued, statements=statements
    )
    notifications = hook.notifications()
    assert [n for notification in notifications for n in notification.event_numbers] == list(
        range(1, issued + 1)
    )
    grant_queries = [
        s for s in statements if "disclosure_grants" in s and s.lstrip().upper().startswith("SELECT")
    ]
    assert len(grant_queries) == len(notifications)  # not one per event


def test_a_consent_withdrawn_before_delivery_means_nothing_is_sent(fast: Service, hook: Receiver) -> None:
    world = make_world(fast)
    subscription_id = active_subscription(world, hook)
    consent_id = world.post_consent(consent(world.patient, world.authority.organization_id))
    world.withdraw(consent_id)  # before any worker ran
    issued = row(fast, subscription_id)["events_issued"]
    assert issued >= 1
    run_jobs(fast, until=lambda: row(fast, subscription_id)["events_delivered"] == issued)
    assert hook.notifications() == []  # every event withheld: nothing about them left the service
    assert [s for s, _ in audit_outcomes(fast)] == ["subscription-handshake"]
    answer = fast.client.get(
        f"/fhir/Subscription/{subscription_id}/$events",
        headers=fast.headers(world.authority, purpose_of_use="PUBHLTH"),
    )
    assert answer.status_code == 200, answer.text
    status = answer.json()["entry"][0]["resource"]
    assert not [p for p in status["parameter"] if p["name"] == "notification-event"]


def test_retries_give_up_into_error_and_the_events_stay_in_events(
    database_url: str, tmp_path: Any, hook: Receiver
) -> None:
    with Service.start(
        database_url, tmp_path, **{**FAST_RETRIES, "subscription_retry_hours": 1.5 / 3600}
    ) as service:
        world = make_world(service)
        subscription_id = active_subscription(world, hook)
        hook.down()
        world.post_consent(consent(world.patient, world.authority.organization_id))
        issued = row(service, subscription_id)["events_issued"]
        run_jobs(service, until=lambda: row(service, subscription_id)["status"] == "error")
        state = row(service, subscription_id)
        assert state["events_delivered"] == 0
        assert "events kept for $events" in state["error"]
        hook.up()
        headers = service.headers(world.authority, purpose_of_use="PUBHLTH")
        status = service.client.get(f"/fhir/Subscription/{subscription_id}/$status", headers=headers)
        assert status.json()["entry"][0]["resource"]["parameter"][2]["valueCode"] == "error"
        answer = service.client.get(f"/fhir/Subscription/{subscription_id}/$events", headers=headers)
        assert answer.status_code == 200, answer.text
        numbers = [
            int(part["valueString"])
            for p in answer.json()["entry"][0]["resource"]["parameter"]
            if p["name"] == "notification-event"
            for part in p["part"]
            if part["name"] == "event-number"
        ]
        assert numbers == list(range(1, issued + 1))
        assert hook.notifications() == []  # nothing more is pushed to a subscription in error


def test_a_quiet_subscription_gets_a_heartbeat(fast: Service, hook: Receiver) -> None:
    world = make_world(fast)
    subscription_id = active_subscription(world, hook, heartbeat=60)
    engine = sa.create_engine(sync_url(fast.settings.database_url))
    with engine.begin() as conn:
        jobs = conn.execute(
            sa.text("SELECT count(*) FROM jobs WHERE kind = :kind AND state = 'queued'"),
            {"kind": HEARTBEAT_KIND},
        ).scalar_one()
        assert jobs == 1  # the chain started at activation, due a period later
        # A period passes (moved back rather than waited for).
        conn.execute(
            sa.text("UPDATE subscription_delivery_state SET last_sent_at = :t WHERE subscription_id = :id"),
            {"t": "2020-01-01 00:00:00+00:00", "id": subscription_id},
        )
        conn.execute(
            sa.text("UPDATE jobs SET run_after = :t WHERE kind = :kind"),
            {"t": "2020-01-01 00:00:00+00:00", "kind": HEARTBEAT_KIND},
        )
    engine.dispose()
    run_jobs(fast, until=lambda: len(hook.notifications("heartbeat")) == 1, what="a heartbeat")
    beat = hook.notifications("heartbeat")[0]
    assert beat.parameter("events-since-subscription-start")["valueString"] == "0"
    assert beat.event_numbers == []


def _events(service: Service, subscription_id: str, after: int) -> list[str]:
    engine = sa.create_engine(sync_url(service.settings.database_url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT focus_type, focus_id, focus_version FROM subscription_events"
                    " WHERE subscription_id = :s AND event_number > :n ORDER BY event_number"
                ),
                {"s": subscription_id, "n": after},
            ).all()
    finally:
        engine.dispose()
    return [f"{t}/{i}/_history/{v}" for t, i, v in rows]


def test_a_relabel_notifies_what_it_makes_visible_and_nothing_it_hides(fast: Service, hook: Receiver) -> None:
    """Rows labelled under older rules (tokens tampered as ``test_relabel_brings_rows_...``
    does): ``mhr records relabel`` recomputes them, and the authority is told of what it may now
    see, never of what it may no longer see."""
    world = make_world(fast)
    subscription_id = active_subscription(world, hook)
    engine = sa.create_engine(sync_url(fast.settings.database_url))
    try:
        with engine.begin() as conn:
            plain = conn.execute(
                sa.text("SELECT labels_token FROM resource_versions WHERE id = :id"),
                {"id": world.observation},
            ).scalar_one()
            # The HIV test carries an unlabelled token (old rules let it through); the plain
            # Observation none at all (written before labels were kept: it fails closed).
            conn.execute(
                sa.text("UPDATE resource_versions SET labels_token = :t WHERE id = :id"),
                {"t": plain, "id": world.hiv_observation},
            )
            conn.execute(
                sa.text("UPDATE resource_versions SET labels_token = NULL WHERE id = :id"),
                {"id": world.observation},
            )
    finally:
        engine.dispose()
    world.post_consent(consent(world.patient, world.authority.organization_id))
    before = row(fast, subscription_id)["events_issued"]
    published = _events(fast, subscription_id, 0)
    assert any(f"Observation/{world.hiv_observation}/" in e for e in published)  # under the old token
    assert not any(f"Observation/{world.observation}/" in e for e in published)

    runtime = fast.fastapi.state.runtime  # type: ignore[attr-defined]

    async def run(db: Database) -> RelabelCounts:
        return await relabel(db, runtime.records)

    assert fast._run(run).changed == 2
    relabelled = _events(fast, subscription_id, before)
    assert len(relabelled) == 1 and relabelled[0].startswith(f"Observation/{world.observation}/")
    issued = row(fast, subscription_id)["events_issued"]
    run_jobs(fast, until=lambda: row(fast, subscription_id)["events_delivered"] == issued)
    sent = [ref for n in hook.notifications() for ref in n.focus_references]
    assert any(f"Observation/{world.observation}/" in ref for ref in sent)
    assert not any(world.hiv_observation in ref for ref in sent)  # hidden by the relabel: withheld
    assert fast._run(run).changed == 0
    assert (
        row(fast, subscription_id)["events_issued"] == issued
    )  # a relabel that changes nothing says nothing


# --- a real worker process, killed with SIGKILL while a notification is in flight -------------


def _worker_env(service: Service) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MHR_")}
    env.update(
        {
            "MHR_ENV": "test",
            "MHR_DATABASE_URL": service.settings.database_url,
            "MHR_PUBLIC_BASE_URL": "http://testserver",
            "MHR_KEYRING_PATH": str(service.settings.keyring_path),
            "MHR_JOB_LEASE_SECONDS": "2",
            "MHR_JOB_POLL_SECONDS": "0.1",
            "MHR_SUBSCRIPTION_RETRY_BASE_SECONDS": "0.1",
            "MHR_SUBSCRIPTION_RETRY_CAP_SECONDS": "0.5",
        }
    )
    return env


def _spawn_worker(service: Service, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "service", "worker", "--workers", "1"],
            cwd=REPO,
            env=_worker_env(service),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def test_a_worker_killed_mid_delivery_loses_nothing_and_repeats_only_event_numbers(
    fast: Service, hook: Receiver, tmp_path: Path
) -> None:
    world = make_world(fast)
    subscription_id = active_subscription(world, hook)
    hook.holding.clear()  # the next notification arrives but is not answered
    world.post_consent(consent(world.patient, world.authority.organization_id))
    issued = row(fast, subscription_id)["events_issued"]
    first = _spawn_worker(fast, tmp_path / "worker-1.log")
    try:
        hook.wait_for(lambda r: len(r.notifications()) == 1, 60, "the first notification to arrive")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
    hook.holding.set()
    # The killed attempt never recorded its outcome: nothing counts as delivered yet...
    assert row(fast, subscription_id)["events_delivered"] == 0
    held = hook.notifications()[0].event_numbers
    # ... but what it sent is on the audit trail: each disclosure entry committed before the POST.
    sending = [d for d in audit_details(fast, "subscription-notification")]
    assert all(d.startswith("events-") and d.endswith(":sending") for d in sending)
    assert [int(n) for d in sending for n in d.removeprefix("events-").split(":")[0].split(",")] == held
    second = _spawn_worker(fast, tmp_path / "worker-2.log")
    try:
        deadline = time.monotonic() + 60
        while row(fast, subscription_id)["events_delivered"] != issued:
            assert time.monotonic() < deadline, (tmp_path / "worker-2.log").read_text()[-3000:]
            time.sleep(0.1)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=30)
    numbers = hook.event_numbers()
    # The held notification again (the IG's duplicate: same event numbers), then all in order.
    assert numbers[: len(held)] == held
    assert numbers[len(held) :] == list(range(1, issued + 1))


def test_a_notification_in_flight_holds_no_lock_that_an_intake_waits_for(
    fast: Service, hook: Receiver, tmp_path: Path
) -> None:
    """A receiver slow to answer (up to the POST timeout) must not stall the clinics' writes: on
    SQLite a transaction open across the POST would hold the only write lock all that time."""
    world = make_world(fast)
    subscription_id = active_subscription(world, hook)
    hook.holding.clear()
    world.post_consent(consent(world.patient, world.authority.organization_id))
    worker = _spawn_worker(fast, tmp_path / "worker.log")
    try:
        hook.wait_for(lambda r: len(r.notifications()) == 1, 60, "the notification to arrive")
        started = time.monotonic()
        world.post_consent(consent(world.patient, world.other.organization_id))
        took = time.monotonic() - started
        hook.holding.set()
        assert took < 3.0, f"the intake waited {took:.1f} s for a notification in flight"
        issued = row(fast, subscription_id)["events_issued"]
        deadline = time.monotonic() + 60
        while row(fast, subscription_id)["events_delivered"] != issued:
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.1)
    finally:
        hook.holding.set()
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
    assert sorted(set(hook.event_numbers())) == list(
        range(1, row(fast, subscription_id)["events_issued"] + 1)
    )


def test_a_heartbeat_in_flight_holds_no_lock_that_an_intake_waits_for(
    fast: Service, hook: Receiver, tmp_path: Path
) -> None:
    world = make_world(fast)
    subscription_id = active_subscription(world, hook, heartbeat=60)
    engine = sa.create_engine(sync_url(fast.settings.database_url))
    with engine.begin() as conn:  # a period passes (moved back rather than waited for)
        conn.execute(
            sa.text("UPDATE subscription_delivery_state SET last_sent_at = :t WHERE subscription_id = :id"),
            {"t": "2020-01-01 00:00:00+00:00", "id": subscription_id},
        )
        conn.execute(
            sa.text("UPDATE jobs SET run_after = :t WHERE kind = :kind"),
            {"t": "2020-01-01 00:00:00+00:00", "kind": HEARTBEAT_KIND},
        )
    engine.dispose()
    hook.holding.clear()
    worker = _spawn_worker(fast, tmp_path / "worker.log")
    try:
        hook.wait_for(lambda r: len(r.notifications("heartbeat")) == 1, 60, "the heartbeat to arrive")
        started = time.monotonic()
        world.post_consent(consent(world.patient, world.other.organization_id))
        took = time.monotonic() - started
        hook.holding.set()
        assert took < 3.0, f"the intake waited {took:.1f} s for a heartbeat in flight"
    finally:
        hook.holding.set()
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)


def test_a_retry_period_under_72_hours_is_refused_outside_development(tmp_path: Path) -> None:
    from service.core.settings import Environment, Settings, SettingsError

    settings = Settings(
        env=Environment.production,
        public_base_url="https://mhr.example.org",
        deployment_name="mhr.example.org/prod",
        keyring_path=tmp_path / "keyring.json",
        subscription_retry_hours=24,
    )
    with pytest.raises(SettingsError, match="MHR_SUBSCRIPTION_RETRY_HOURS is below 72"):
        settings.check_safe_to_start()
    Settings(**{**settings.model_dump(), "subscription_retry_hours": 72}).check_safe_to_start()

"""Notification latency: from the commit of an exam to an id-only notification's receipt.

    python -m bench.notify_latency [--rate 48] [--seconds 20] [--max-count N]

A fresh PostgreSQL database (bench.parties), ``mhr serve --workers 2`` on it, a rest-hook
receiver in this process (http.server on a free port), and authority A subscribed to the
record-visible topic. The clinic then submits exam Bundles (bench.generate, each carrying a
Consent for authority A) at a fixed open-loop rate, by default W1's measured intake rate (48
exams/s, README "Performance"), and every notification received is timed: latency per event is
its receipt time minus its event timestamp (set in the transaction that committed the exam,
so slightly before the commit; same clock, same machine). Reported: events, notifications,
p50/p99/max of the per-event latency, the intake rate achieved and its errors. Target p99 <= 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from bench.generate import exam
from bench.parties import database_url, setup
from bench.run import mhr_server

IG = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
TOPIC = "https://mhr.example.org/fhir/SubscriptionTopic/record-visible"
DB_NAME = "mhr_bench_notify"


class Receipts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.notifications = 0
        self.numbers: set[int] = set()

    def record(self, bundle: dict[str, Any], received: float) -> None:
        status = bundle["entry"][0]["resource"]
        with self.lock:
            for parameter in status.get("parameter", []):
                if parameter["name"] != "notification-event":
                    continue
                parts = {p["name"]: p for p in parameter["part"]}
                number = int(parts["event-number"]["valueString"])
                if number in self.numbers:
                    continue  # a repeat (same event number) is not a new receipt
                self.numbers.add(number)
                stamp = datetime.fromisoformat(parts["timestamp"]["valueInstant"].replace("Z", "+00:00"))
                self.latencies.append(received - stamp.timestamp())
            if any(p["name"] == "notification-event" for p in status.get("parameter", [])):
                self.notifications += 1


def start_receiver(receipts: Receipts) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            receipts.record(json.loads(body), time.time())
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def subscribe(base: str, token: str, endpoint: str, max_count: int | None) -> str:
    channel: dict[str, Any] = {
        "type": "rest-hook",
        "endpoint": endpoint,
        "payload": "application/fhir+json",
        "_payload": {"extension": [{"url": IG + "backport-payload-content", "valueCode": "id-only"}]},
    }
    if max_count is not None:
        channel["extension"] = [{"url": IG + "backport-max-count", "valuePositiveInt": max_count}]
    body = {
        "resourceType": "Subscription",
        "meta": {"profile": [IG + "backport-subscription"]},
        "status": "requested",
        "reason": "bench: notification latency",
        "criteria": TOPIC,
        "channel": channel,
    }
    response = httpx.post(
        f"{base}/fhir/Subscription",
        content=json.dumps(body),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"},
        timeout=30,
    )
    response.raise_for_status()
    subscription_id = str(response.json()["id"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = httpx.get(
            f"{base}/fhir/Subscription/{subscription_id}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        ).json()["status"]
        if status == "active":
            return subscription_id
        time.sleep(0.2)
    raise SystemExit("the subscription did not become active (handshake)")


async def intake(base: str, token: str, rate: float, seconds: float) -> tuple[int, int, float]:
    """POST exams at ``rate`` per second (open loop); returns (sent, errors, elapsed)."""
    count = int(rate * seconds)
    bodies = [json.dumps(exam(i, seed=7)).encode() for i in range(count)]
    errors = 0
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as client:

        async def post(body: bytes) -> None:
            nonlocal errors
            try:
                response = await client.post(f"{base}/fhir", content=body, headers=headers)
                if response.status_code != 200:
                    errors += 1
            except httpx.HTTPError:
                errors += 1

        started = time.monotonic()
        tasks = []
        for index, body in enumerate(bodies):
            delay = started + index / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(post(body)))
        await asyncio.gather(*tasks)
        return count, errors, time.monotonic() - started


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=48.0, help="exams per second (W1's measured rate)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-count", type=int, default=None, help="events per notification")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="mhr-notify-bench-"))
    parties = setup(DB_NAME, workdir)
    receipts = Receipts()
    receiver = start_receiver(receipts)
    endpoint = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    with mhr_server("mhr-notify", database_url(DB_NAME), workdir / "keyring.json", workdir) as server:
        base = server.base_url
        authority = parties["authority-a"].token(base, "system/Subscription.cruds", purpose="PUBHLTH")
        clinic = parties["clinic"].token(base, "system/*.cruds")
        subscribe(base, authority, endpoint, args.max_count)
        sent, errors, elapsed = asyncio.run(intake(base, clinic, args.rate, args.seconds))
        issued_deadline = time.monotonic() + 120
        # Wait for the tail: until no new event arrives for 5 s.
        last, seen = time.monotonic(), -1
        while time.monotonic() < issued_deadline:
            with receipts.lock:
                now_seen = len(receipts.numbers)
            if now_seen != seen:
                seen, last = now_seen, time.monotonic()
            elif time.monotonic() - last > 5:
                break
            time.sleep(0.2)
    receiver.shutdown()
    latencies = receipts.latencies
    print(
        f"intake: {sent} exams in {elapsed:.1f} s ({sent / elapsed:.1f}/s, asked {args.rate:g}/s), "
        f"{errors} errors"
    )
    if not latencies:
        print("no notification received")
        return 1
    print(
        f"notifications: {receipts.notifications}, events: {len(latencies)} "
        f"(numbers {min(receipts.numbers)}..{max(receipts.numbers)})"
    )
    print(
        f"commit-to-receipt latency per event: p50 {statistics.median(latencies) * 1000:.0f} ms, "
        f"p99 {percentile(latencies, 0.99) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms "
        f"(target p99 <= 2000 ms)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

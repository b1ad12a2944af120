"""Notification latency: from the commit of an exam to an id-only notification's receipt.

    python -m bench.notify_latency [--rate 48] [--seconds 20] [--max-count N]
                                   [--w1-seconds 15] [--tree bench/.state/baseline/<commit>]

A fresh PostgreSQL database (bench.parties), ``mhr serve --workers 2`` on it, a rest-hook
receiver in this process (http.server on a free port), and authority A subscribed to the
record-visible topic. The clinic then submits exam Bundles (bench.generate, each carrying a
Consent for authority A) at a fixed open-loop rate, by default W1's measured intake rate (48
exams/s, README "Performance"), and every notification received is timed: latency per event is
its receipt time minus its event timestamp (set in the transaction that committed the exam,
so slightly before the commit; same clock, same machine). Reported: events, notifications,
p50/p99/max of the per-event latency, the intake rate achieved and its errors. Target p99 <= 2 s.

``--job-process``: the deployment that runs its workers apart (#13: ``mhr worker``): the two
server processes run no job workers (``MHR_JOB_WORKERS=0``) and one ``mhr worker`` process
delivers, so that the intake's requests and the deliveries share the cores through the
operating system's scheduler rather than one event loop.

``--w1-seconds S``: first W1's closed loop (8 connections POSTing exams for S seconds, README
"Performance"), before the subscription exists and again with it (after its events drained), so
that what publishing costs the intake is measured on the same server. ``--tree``: run the server
of another checkout (a baseline built by ``python -m bench.baseline REF``) for a before/after in
one session; ``--db``: the database's name (default from BENCH_DB_PREFIX).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from bench.generate import exam
from bench.parties import DB_PREFIX, database_url, setup
from bench.run import mhr_server
from bench.servers import REPO
from bench.workloads import analyze, mhr_env
from service.store.migrate import upgrade

IG = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
TOPIC = "https://mhr.example.org/fhir/SubscriptionTopic/record-visible"
DB_NAME = f"{DB_PREFIX}_notify"
W1_CONNECTIONS = 8


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


async def closed_loop(base: str, token: str, seconds: float, first: int) -> dict[str, float]:
    """W1: ``W1_CONNECTIONS`` clients POSTing exams back to back for ``seconds``."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
    latencies: list[float] = []
    errors = 0
    counter = iter(range(first, first + 1_000_000))
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=60) as client:

        async def loop() -> None:
            nonlocal errors
            while time.monotonic() < deadline:
                body = json.dumps(exam(next(counter), seed=7)).encode()
                started = time.monotonic()
                try:
                    response = await client.post(f"{base}/fhir", content=body, headers=headers)
                    errors += response.status_code != 200
                except httpx.HTTPError:
                    errors += 1
                latencies.append(time.monotonic() - started)

        started = time.monotonic()
        await asyncio.gather(*(loop() for _ in range(W1_CONNECTIONS)))
        elapsed = time.monotonic() - started
    return {
        "exams": len(latencies),
        "per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000),
        "p99_ms": round(percentile(latencies, 0.99) * 1000),
        "errors": errors,
    }


def wait_for_tail(receipts: Receipts, quiet_seconds: float = 5, limit: float = 120) -> None:
    """Until no new event arrives for ``quiet_seconds``."""
    deadline = time.monotonic() + limit
    last, seen = time.monotonic(), -1
    while time.monotonic() < deadline:
        with receipts.lock:
            now_seen = len(receipts.numbers)
        if now_seen != seen:
            seen, last = now_seen, time.monotonic()
        elif time.monotonic() - last > quiet_seconds:
            return
        time.sleep(0.2)


async def intake(
    base: str, token: str, rate: float, seconds: float, first: int = 0
) -> tuple[int, int, float]:
    """POST exams at ``rate`` per second (open loop); returns (sent, errors, elapsed)."""
    count = int(rate * seconds)
    bodies = [json.dumps(exam(i, seed=7)).encode() for i in range(first, first + count)]
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


def _migrate_with(tree: Path, url: str) -> None:
    """A baseline tree's database at its own head revision, by its own migrations."""
    env = {**os.environ, "MHR_ENV": "development", "MHR_DATABASE_URL": url}
    subprocess.run([str(tree / ".venv" / "bin" / "mhr"), "migrate"], cwd=tree, env=env, check=True)


@contextmanager
def job_process(wanted: bool, tree: Path, url: str, workdir: Path, port: int) -> Iterator[None]:
    """``mhr worker`` (one job worker) beside the server, on its database, keyring and base URL."""
    if not wanted:
        yield
        return
    env = {**os.environ, **mhr_env(url, workdir / "keyring.json", port), "MHR_JOB_WORKERS": "1"}
    with (workdir / "mhr-worker.log").open("wb") as log:
        process = subprocess.Popen(
            [str(tree / ".venv" / "bin" / "mhr"), "worker"], cwd=tree, env=env, stdout=log, stderr=log
        )
    try:
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def planner_statistics_kept(database: str, every_seconds: float = 5.0) -> Iterator[None]:
    """ANALYZE every few seconds while the bench runs, as autovacuum keeps the statistics of a
    deployment's growing tables. This machine's PostgreSQL runs with autovacuum off, and this
    bench starts from empty tables: without it, statements keep plans made for empty tables
    (the ifNoneExist lookup scanned every Patient of the clinic: 2.7 ms at 1,000 exams, against
    0.14 ms once analyzed), and PostgreSQL's CPU, not mhr's, set the intake rate."""
    stop = threading.Event()

    def keep() -> None:
        while not stop.wait(every_seconds):
            analyze(database)

    thread = threading.Thread(target=keep, name="bench-analyze", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=60)


def latency_summary(latencies: list[float]) -> str:
    return (
        f"{len(latencies)} events, p50 {statistics.median(latencies) * 1000:.0f} ms, "
        f"p99 {percentile(latencies, 0.99) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms "
        "(target p99 <= 2000 ms)"
    )


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=48.0, help="exams per second (W1's measured rate)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-count", type=int, default=None, help="events per notification")
    parser.add_argument("--w1-seconds", type=float, default=0, help="W1 closed loop first, without and with")
    parser.add_argument("--tree", type=Path, default=REPO, help="the checkout whose server runs")
    parser.add_argument("--db", default=DB_NAME, help="database name (recreated)")
    parser.add_argument("--job-process", action="store_true", help="deliver from one `mhr worker` process")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="mhr-notify-bench-"))
    tree = args.tree.resolve()
    migrate_database = upgrade if tree == REPO.resolve() else partial(_migrate_with, tree)
    parties = setup(args.db, workdir, migrate_database)
    receipts = Receipts()
    receiver = start_receiver(receipts)
    endpoint = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    if args.job_process:
        os.environ["MHR_JOB_WORKERS"] = "0"  # the server's processes (mhr_server passes os.environ on)
    with (
        mhr_server(
            "mhr-notify", database_url(args.db), workdir / "keyring.json", workdir, tree=tree
        ) as server,
        job_process(args.job_process, tree, database_url(args.db), workdir, server.port),
        planner_statistics_kept(args.db),
    ):
        base = server.base_url
        authority = parties["authority-a"].token(base, "system/Subscription.cruds", purpose="PUBHLTH")
        clinic = parties["clinic"].token(base, "system/*.cruds")
        if args.w1_seconds:
            w1 = asyncio.run(closed_loop(base, clinic, args.w1_seconds, 100_000))
            print(f"W1 without a subscriber: {json.dumps(w1)}")
        subscribe(base, authority, endpoint, args.max_count)
        if args.w1_seconds:
            w1 = asyncio.run(closed_loop(base, clinic, args.w1_seconds, 200_000))
            wait_for_tail(receipts)
            print(f"W1 with a subscriber:    {json.dumps(w1)}")
            with receipts.lock:
                if receipts.latencies:  # W1's own rate: the closed loop's events, commit to receipt
                    print(f"  its events, commit to receipt: {latency_summary(receipts.latencies)}")
                receipts.latencies.clear()
                receipts.notifications = 0
                earlier = set(receipts.numbers)
        else:
            earlier = set()
        sent, errors, elapsed = asyncio.run(intake(base, clinic, args.rate, args.seconds))
        wait_for_tail(receipts)
    receiver.shutdown()
    latencies = receipts.latencies
    print(
        f"server: {tree.name} ({'working tree' if tree == REPO.resolve() else 'baseline'}), "
        f"{'one mhr worker process delivering' if args.job_process else 'job workers in the server'}"
    )
    print(
        f"intake: {sent} exams in {elapsed:.1f} s ({sent / elapsed:.1f}/s, asked {args.rate:g}/s), "
        f"{errors} errors"
    )
    if not latencies:
        print("no notification received")
        return 1
    numbers = receipts.numbers - earlier
    print(
        f"notifications: {receipts.notifications}, events: {len(latencies)} "
        f"(numbers {min(numbers)}..{max(numbers)})"
    )
    print(f"commit-to-receipt latency per event: {latency_summary(latencies)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

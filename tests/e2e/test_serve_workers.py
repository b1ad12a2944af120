"""``mhr serve --workers 2`` as operators run it: logs from every worker, and a drain on SIGTERM.

The drain test is what a rolling restart looks like from outside: a client loop opening fresh
connections throughout a SIGTERM, plus slow uploads in flight. Each attempt must end in a
response or a refused connection (the client then tries another replica), never in a
connection that was accepted and then reset or closed without an answer.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from e2e_helpers import free_port, server_env, wait_until_ready
from mhr_testkit import EXAMPLES, REPO, Party, Service, live_token, load_example, submit, sync_url, wait_for

DRAIN_SECONDS = 2.0


@dataclass
class Workers:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_lines(self) -> list[str]:
        return [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]


@contextmanager
def workers_running(database_url: str, tmp_path: Path, count: int = 2, **env: str) -> Iterator[Workers]:
    port = free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--workers", str(count)],
            cwd=REPO,
            env={**server_env(database_url, tmp_path, port), "MHR_RATE_LIMIT_ENABLED": "false", **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    workers = Workers(process, port, log_path)
    try:
        wait_until_ready(workers.base_url, process, log_path, timeout=90)
        # Both workers up, so that both take part in what follows: each logs its start (the
        # logging test checks that it does; without those lines, a fixed wait stands in).
        started = time.monotonic()
        while sum("Application startup complete" in line for line in workers.log_lines()) < count:
            if time.monotonic() > started + 15:
                break
            time.sleep(0.2)
        yield workers
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def test_every_worker_logs_json_lines_without_exception_text(database_url: str, tmp_path: Path) -> None:
    canary = f"PHI-CANARY-{uuid.uuid4().hex}"
    with Service.start(database_url, tmp_path) as registry:
        clinic = registry.register("clinic", "clinic")
        reply = submit(registry, clinic, load_example(EXAMPLES[1]))
        assert reply.status_code == 200, reply.text
        patient = next(
            e["response"]["location"].split("/")[1]
            for e in reply.json()["entry"]
            if e["response"]["location"].startswith("Patient/")
        )
        with workers_running(database_url, tmp_path, MHR_DRAIN_SECONDS="0") as workers:
            # A stored audit entry altered under the service (its date now quotes a value):
            # reading it fails in application code with an exception whose text holds that value.
            engine = sa.create_engine(sync_url(database_url))
            with engine.begin() as conn:
                entry = conn.execute(
                    sa.text("SELECT entry_id FROM audit_refs WHERE kind = 'patient' AND value = :p LIMIT 1"),
                    {"p": patient},
                ).scalar_one()
                conn.execute(
                    sa.text("UPDATE audit_entries SET event_type = 'disclosure', content = :c WHERE id = :i"),
                    # Still a disclosure about this migrant by its content (the report checks that),
                    # with a date that cannot be read.
                    {
                        "c": json.dumps(
                            {"type": "disclosure", "outcome": "0", "patients": [patient], "recorded": canary}
                        ).encode(),
                        "i": entry,
                    },
                )
            engine.dispose()
            token = live_token(workers.base_url, clinic, "system/*.rs")
            failed = httpx.get(
                f"{workers.base_url}/fhir/Patient/{patient}/$disclosures",
                headers={"Authorization": f"Bearer {token}"},
                timeout=30,
            )
            assert failed.status_code == 500
            assert canary not in failed.text
            for _ in range(10):
                assert httpx.get(f"{workers.base_url}/healthz", timeout=10).status_code == 200
            time.sleep(0.5)  # the log lines of the last requests
            lines = workers.log_lines()

    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"a log line is not JSON: {line[:300]}")
    assert canary not in "\n".join(lines)
    assert "Traceback" not in "\n".join(lines)
    started = {r["pid"] for r in records if r["msg"] == "Application startup complete."}
    assert len(started) == 2, "each worker logs through the JSON formatter"
    access = [r for r in records if r["logger"] == "mhr.access"]
    assert {r["pid"] for r in access} <= started
    assert any(r["route"] == "/healthz" and r["status"] == 200 for r in access)
    assert any(r["route"] == "/fhir/Patient/{patient_id}/$disclosures" and r["status"] == 500 for r in access)
    error = next(r for r in records if r["msg"] == "unhandled error")
    assert error["level"] == "ERROR" and error["error_type"] == "ValueError"
    assert error["stack"] and error["request_id"] == failed.headers["x-request-id"]


def _records(workers: Workers) -> list[dict[str, Any]]:
    return [json.loads(line) for line in workers.log_lines() if line.startswith("{")]


def test_the_background_process_does_the_shared_work_and_is_replaced_when_killed(
    database_url: str, tmp_path: Path
) -> None:
    """``mhr serve --workers 2``: two server processes and one background process, which seals
    the audit log; killed with SIGKILL, it is replaced and the sealing goes on."""
    with Service.start(database_url, tmp_path) as registry:
        clinic = registry.register("clinic", "clinic")
    engine = sa.create_engine(sync_url(database_url))

    def sealed_all() -> bool:
        with engine.connect() as conn:
            size = conn.execute(sa.text("SELECT coalesce(max(size), 0) FROM audit_checkpoints")).scalar_one()
            return bool(size >= conn.execute(sa.text("SELECT count(*) FROM audit_entries")).scalar_one())

    def background_pids(workers: Workers) -> list[int]:
        return [
            r["pid"]
            for r in _records(workers)
            if r["logger"] == "mhr.jobs" and r["msg"] == "background process started"
        ]

    try:
        with workers_running(database_url, tmp_path) as workers:
            wait_for(lambda: len(background_pids(workers)) == 1, 30, "the background process")
            first = background_pids(workers)[0]
            servers = {r["pid"] for r in _records(workers) if r["msg"] == "Application startup complete."}
            assert len(servers) == 2 and first not in servers
            os.kill(first, signal.SIGKILL)
            wait_for(lambda: len(background_pids(workers)) == 2, 60, "a new background process")
            assert any(r["msg"] == "mhr-background died: replacing it" for r in _records(workers))
            token = live_token(workers.base_url, clinic, "system/*.cruds")
            reply = httpx.post(
                f"{workers.base_url}/fhir",
                content=json.dumps(load_example(EXAMPLES[1])),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"},
                timeout=60,
            )
            assert reply.status_code == 200, reply.text
            wait_for(sealed_all, 30, "the new background process to seal the new entries")
        assert workers.process.returncode == 0, workers.log_path.read_text()[-3000:]
    finally:
        engine.dispose()


# --- drain on SIGTERM ---------------------------------------------------------------------


def fresh_request(port: int, path: str = "/healthz") -> tuple[str, bytes]:
    """One request on a new connection: ("response" | "refused" | "reset" | "empty" | "timeout", bytes)."""
    sock = socket.socket()
    sock.settimeout(30)
    try:
        try:
            sock.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return "refused", b""
        data = b""
        try:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            while chunk := sock.recv(65536):
                data += chunk
        except (ConnectionResetError, BrokenPipeError):
            return "reset", data
        except TimeoutError:
            return "timeout", data
        return ("response" if data.startswith(b"HTTP/1.1 ") else "empty"), data
    finally:
        sock.close()


def slow_search(port: int, token: str, seconds: float) -> tuple[str, bytes]:
    """An authenticated POST _search whose form body trickles in over ``seconds``: in flight."""
    body = b"_count=5&_lastUpdated=gt2000-01-01" + b"&_total=accurate" * 8
    head = (
        "POST /fhir/Patient/_search HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    pieces = [body[i : i + 8] for i in range(0, len(body), 8)]
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        sock.sendall(head)
        for piece in pieces:
            time.sleep(seconds / len(pieces))
            sock.sendall(piece)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return ("response" if data.startswith(b"HTTP/1.1 ") else "empty"), data
    except (ConnectionResetError, BrokenPipeError):
        return "reset", b""
    finally:
        sock.close()


@dataclass
class Load:
    port: int
    outcomes: Counter[str] = field(default_factory=Counter)
    first_refused: float | None = None
    draining_seen: list[dict[str, Any]] = field(default_factory=list)
    closing_after_drain: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def client_loop(self) -> None:
        while not self.stop.is_set():
            outcome, _ = fresh_request(self.port)
            with self.lock:
                self.outcomes[outcome] += 1
                if outcome == "refused" and self.first_refused is None:
                    self.first_refused = time.monotonic()
            if outcome == "refused":
                time.sleep(0.01)  # nothing listens: no need to spin

    def readiness_loop(self) -> None:
        while not self.stop.is_set():
            outcome, data = fresh_request(self.port, "/readyz")
            if outcome == "response" and data.startswith(b"HTTP/1.1 503"):
                head, _, body = data.partition(b"\r\n\r\n")
                with self.lock:
                    self.draining_seen.append(json.loads(body))
                    self.closing_after_drain += b"connection: close" in head.lower()
            time.sleep(0.05)


@pytest.mark.parametrize("count", [2, 1], ids=["2-workers", "1-worker"])
def test_sigterm_drains_then_refuses_and_never_resets(database_url: str, tmp_path: Path, count: int) -> None:
    with Service.start(database_url, tmp_path) as registry:
        clinic: Party = registry.register("clinic", "clinic")
        with workers_running(
            database_url,
            tmp_path,
            count,
            MHR_DRAIN_SECONDS=str(DRAIN_SECONDS),
            MHR_GRACEFUL_SHUTDOWN_SECONDS="20",
        ) as workers:
            token = live_token(workers.base_url, clinic, "system/*.rs")
            load = Load(workers.port)
            threads = [threading.Thread(target=load.client_loop) for _ in range(4)]
            threads.append(threading.Thread(target=load.readiness_loop))
            slow_results: list[tuple[str, bytes, float]] = []

            def slow() -> None:
                outcome, data = slow_search(workers.port, token, DRAIN_SECONDS + 2.5)
                slow_results.append((outcome, data, time.monotonic()))

            slow_threads = [threading.Thread(target=slow) for _ in range(3)]
            for thread in threads + slow_threads:
                thread.start()
            time.sleep(1.0)
            assert load.outcomes["response"] > 0 and not load.outcomes["refused"]
            signalled = time.monotonic()
            workers.process.send_signal(signal.SIGTERM)
            code = workers.process.wait(timeout=60)
            exited = time.monotonic()
            time.sleep(0.5)  # attempts after the exit: refused
            load.stop.set()
            for thread in threads + slow_threads:
                thread.join(timeout=60)

    counts = dict(load.outcomes)
    slow_outcomes = [r[0] for r in slow_results]
    print(f"\nSIGTERM under load with {count} worker(s): {counts}; slow in-flight: {slow_outcomes}")
    assert code == 0, workers.log_path.read_text()[-3000:]
    assert not {"reset", "empty", "timeout"} & set(counts), counts
    assert counts["response"] > 0 and counts["refused"] > 0
    # Draining was reported, with a reason, and those answers retired their connections.
    assert load.draining_seen and all(s["status"] == "draining" and s["reason"] for s in load.draining_seen)
    assert load.closing_after_drain == len(load.draining_seen)
    # The slow requests in flight were answered, after new connections were already refused.
    assert [outcome for outcome, _, _ in slow_results] == ["response"] * 3
    assert all(data.startswith(b"HTTP/1.1 200") for _, data, _ in slow_results)
    assert load.first_refused is not None
    assert signalled + DRAIN_SECONDS - 0.5 < load.first_refused < min(done for _, _, done in slow_results)
    assert exited >= max(done for _, _, done in slow_results) - 0.5

"""Database outage: our own throwaway PostgreSQL is stopped mid-load and started again.

While it is down the service answers 503 + Retry-After (an OperationOutcome, no stack trace)
and /readyz says unavailable; once it is back the same process recovers by itself.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from mhr_testkit import Service
from pg_cluster import pg_bin_dir, throwaway_cluster
from resilience_kit import ServerProcess, unique_bundle

from service.store import migrate

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

OUTAGE_SECONDS = 4.0


@pytest.mark.skipif(
    pg_bin_dir() is None, reason="PostgreSQL server binaries (initdb, pg_ctl) are not installed"
)
def test_database_outage_answers_503_and_recovers_without_restart(tmp_path: Path) -> None:
    with throwaway_cluster() as cluster:
        migrate.upgrade(cluster.url)
        with Service.start(cluster.url, tmp_path) as registry:
            clinic = registry.register("clinic", "clinic")
        server = ServerProcess(cluster.url, tmp_path, extra_env={"MHR_RATE_LIMIT_ENABLED": "false"})
        server.start()
        try:
            _run_outage(server, cluster, server.token(clinic))
        finally:
            server.stop()
        assert "Traceback" not in server.log_path.read_text()


def _run_outage(server: ServerProcess, cluster: object, token: str) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    stop = threading.Event()
    seen: list[tuple[float, int, str, dict[str, str]]] = []

    def load() -> None:
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            while not stop.is_set():
                bundle, _ = unique_bundle()
                for method, url, body in (
                    ("POST", "/fhir", json.dumps(bundle)),
                    ("GET", "/fhir/Patient?_count=5", None),
                ):
                    response = client.request(
                        method, url, content=body, headers={**auth, "Content-Type": "application/fhir+json"}
                    )
                    seen.append(
                        (time.monotonic(), response.status_code, response.text, dict(response.headers))
                    )

    threads = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    cluster.stop("fast")  # type: ignore[attr-defined]
    down_at = time.monotonic()
    time.sleep(OUTAGE_SECONDS)
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        ready_down = client.get("/readyz")
    cluster.start()  # type: ignore[attr-defined]
    up_at = time.monotonic()
    # Recovery: the first successful write after the database is back, with /readyz 200.
    recovered_at = None
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        while time.monotonic() - up_at < 30:
            bundle, _ = unique_bundle()
            write = client.post(
                "/fhir", content=json.dumps(bundle), headers={**auth, "Content-Type": "application/fhir+json"}
            )
            if write.status_code == 200 and client.get("/readyz").status_code == 200:
                recovered_at = time.monotonic()
                break
            time.sleep(0.1)
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)

    statuses = Counter(status for _, status, _, _ in seen)
    errors = [(status, text, headers) for _, status, text, headers in seen if status != 200]
    figures = {
        "outage seconds": round(up_at - down_at, 2),
        "requests": len(seen),
        "statuses": dict(statuses),
        "errors seen": len(errors),
        "recovery seconds after start": None if recovered_at is None else round(recovered_at - up_at, 2),
        "server restarted": server.starts != 1,
    }
    print("\ndatabase outage:", json.dumps(figures))
    assert ready_down.status_code == 503 and ready_down.headers.get("retry-after")
    assert ready_down.json()["checks"]["database"] is False
    assert errors, "the outage was not seen by the load"
    for status, text, headers in errors:
        assert status == 503, (status, text)
        assert headers.get("retry-after", "").isdigit()
        outcome = json.loads(text)
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["code"] == "transient"
        assert "Traceback" not in text and "asyncpg" not in text and "127.0.0.1" not in text
    assert recovered_at is not None, "the service did not recover within 30 s"
    assert server.alive() and server.starts == 1
    # After recovery, nothing but success.
    assert all(status == 200 for at, status, _, _ in seen if at > recovered_at + 0.5)

"""Crash consistency: a real server under intake load is SIGKILLed several times.

After each restart, and at the end: every acknowledged submission is present and readable,
no bundle is half-stored, the audit log verifies, and every acknowledged write has its audit
entry. Figures are printed (run with -s to see them) and asserted.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from mhr_testkit import Service
from resilience_kit import ServerProcess, audit_contents, run_cli, scalar, unique_bundle

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

KILLS = 5
WRITERS = 4


@dataclass
class Attempt:
    passport: str
    status: int | None = None  # None: no answer (connection refused or cut by the kill)
    request_id: str | None = None
    locations: list[str] = field(default_factory=list)


def _writer(server: ServerProcess, token: list[str], stop: threading.Event, attempts: list[Attempt]) -> None:
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            bundle, passport = unique_bundle()
            attempt = Attempt(passport)
            attempts.append(attempt)
            try:
                response = client.post(
                    f"{server.base_url}/fhir",
                    content=json.dumps(bundle),
                    headers={"Content-Type": "application/fhir+json", "Authorization": f"Bearer {token[0]}"},
                )
            except httpx.HTTPError:
                time.sleep(0.2)  # the server is down: it restarts within seconds
                continue
            attempt.status = response.status_code
            attempt.request_id = response.headers.get("x-request-id")
            if response.status_code == 200:
                attempt.locations = [e["response"]["location"] for e in response.json()["entry"]]


def test_sigkill_under_intake_load_loses_no_acknowledged_write(
    server: ServerProcess, registry: Service, pg_database: str
) -> None:
    clinic = registry.register("clinic", "clinic")
    server.start()
    token = [server.token(clinic)]
    attempts: list[Attempt] = []
    stop = threading.Event()
    threads = [
        threading.Thread(target=_writer, args=(server, token, stop, attempts), daemon=True)
        for _ in range(WRITERS)
    ]
    rng = random.Random(7)
    restarts: list[float] = []
    for thread in threads:
        thread.start()
    try:
        for _ in range(KILLS):
            time.sleep(rng.uniform(1.0, 2.5))
            server.kill()
            restarts.append(server.start())
        time.sleep(1.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)

    acknowledged = [a for a in attempts if a.status == 200]
    statuses = Counter(a.status for a in attempts)
    assert len(acknowledged) >= 20, statuses
    # Nothing but success or "no answer": a kill must not surface as a 5xx to the clients that got one.
    assert set(statuses) <= {200, None}, statuses

    # Every acknowledged submission is present and readable, version by version.
    reader = server.token(clinic)
    lost = 0
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {reader}"}) as client:
        for attempt in acknowledged:
            for location in attempt.locations:
                if client.get(f"/fhir/{location}").status_code != 200:
                    lost += 1

    # No bundle half-stored: every migrant has the whole exam (the bundle's resources plus the
    # Provenance), and no subject exists without its resources.
    expected = len(acknowledged[0].locations) + 1
    per_subject = scalar(
        pg_database,
        "SELECT json_agg(n) FROM (SELECT count(r.id) AS n FROM subjects s "
        "LEFT JOIN resources r ON r.subject_id = s.id GROUP BY s.id) counts",
    )
    assert per_subject is not None
    assert set(per_subject) == {expected}, Counter(per_subject)
    stored = len(per_subject)
    assert stored >= len(acknowledged)

    # The audit log verifies, and every acknowledged write has its entry.
    env = {
        "MHR_ENV": "development",
        "MHR_DATABASE_URL": pg_database,
        "MHR_KEYRING_PATH": str(server.tmp_path / "keyring.json"),
    }
    sealed = run_cli("audit", "seal", env=env)
    assert sealed.returncode == 0, sealed.stderr
    vkey = run_cli("audit", "key", env=env).stdout.strip()
    verified = run_cli("audit", "verify", "--database-url", pg_database, "--vkey", vkey, env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    audited = {
        c["request"]
        for c in audit_contents(pg_database)
        if c["subtype"] == "transaction" and c["outcome"] == "0"
    }
    missing_audit = [a.passport for a in acknowledged if a.request_id not in audited]
    # Transactions on the audit record = bundles stored (acknowledged or cut off after commit).
    assert len(audited) == stored

    figures: dict[str, Any] = {
        "kills": KILLS,
        "attempted": len(attempts),
        "acknowledged": len(acknowledged),
        "stored (incl. committed but unanswered)": stored,
        "lost": lost,
        "missing audit entries": len(missing_audit),
        "restart seconds (max)": round(max(restarts), 2),
        "audit": verified.stdout.strip().splitlines()[-1],
    }
    print("\ncrash consistency:", json.dumps(figures))
    assert lost == 0
    assert missing_audit == []

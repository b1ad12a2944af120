"""Work limits, measured against a running server: how fast worst-case bodies are refused, how long
a body at the value limit takes to store, and how /healthz answers meanwhile.

    .venv/bin/python -m bench.body_limits [--repeat 5]

One uvicorn worker (so /healthz shares the event loop with the body being handled), SQLite,
rate limiting off. Figures are medians over ``--repeat`` requests, with the /healthz latency
percentiles measured while those requests ran, next to a baseline from the same run: an idle
/healthz and an ordinary exam submission.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench.servers import free_port, running
from security.jwk import generate_client_key, public_jwk, sign_client_assertion
from service.identity.registry import ClientRegistration, add_client, add_organization
from service.identity.repository import IdentityRepository
from service.store import migrate
from service.store.database import Database

REPO = Path(__file__).resolve().parents[1]
EXAM = REPO / "fhir" / "examples" / "exam-adult-normal.json"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
BODY_BYTES = 7 * 1024 * 1024
OBSERVATION = (
    b'{"resourceType":"Observation","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/x"},'
)


def _filled(prefix: bytes, item: bytes, suffix: bytes) -> bytes:
    count = (BODY_BYTES - len(prefix) - len(suffix)) // (len(item) + 1)
    return prefix + b",".join([item] * count) + suffix


WORST: dict[str, Callable[[], bytes]] = {
    "million-extensions": lambda: _filled(OBSERVATION + b'"extension":[', b'{"url":"x"}', b"]}"),
    "empty-arrays": lambda: _filled(OBSERVATION + b'"extension":[', b"[]", b"]}"),
    "digits": lambda: _filled(OBSERVATION + b'"x":[', b"0", b"]}"),
}


def _near_limit(patient: str) -> bytes:
    """A valid Observation just under the default value limit (100,000): ten extensions of
    3,330 nested ones, each of three values (under the 10,000-item array limit)."""
    inner = [{"url": "https://clinic.example.org/fhir/ext", "valueString": "v"}] * 3330
    resource = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": f"Patient/{patient}"},
        "extension": [{"url": "https://clinic.example.org/fhir/ext", "extension": inner}] * 10,
    }
    return json.dumps(resource).encode()


def _register(url: str) -> tuple[str, Any]:
    async def work() -> tuple[str, Any]:
        database = Database(url)
        try:
            async with database.transaction() as session:
                repo = IdentityRepository(session)
                org = await add_organization(repo, name="Bench clinic", kind="clinic")
                key = generate_client_key("EC")
                client = await add_client(
                    repo,
                    ClientRegistration(organization=org.id, role="clinic", jwks={"keys": [public_jwk(key)]}),
                )
                return client.id, key
        finally:
            await database.dispose()

    return asyncio.run(work())


def _token(base: str, client_id: str, key: Any) -> str:
    token_url = f"{base}/auth/token"
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": JWT_BEARER,
        "client_assertion": sign_client_assertion(key, client_id=client_id, token_url=token_url),
        "scope": "system/*.cruds",
    }
    response = httpx.post(token_url, data=form, timeout=30)
    response.raise_for_status()
    return str(response.json()["access_token"])


@contextmanager
def _healthz(base: str) -> Iterator[list[float]]:
    latencies: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=base, timeout=60) as client:
            while not stop.is_set():
                began = time.perf_counter()
                client.get("/healthz")
                latencies.append(time.perf_counter() - began)
                stop.wait(0.01)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    while len(latencies) < 5:
        time.sleep(0.01)
    latencies.clear()
    try:
        yield latencies
    finally:
        stop.set()
        thread.join(timeout=120)


def _ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50_ms": round(1000 * statistics.median(ordered), 1),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 1),
        "max_ms": round(1000 * ordered[-1], 1),
    }


def _measure(
    base: str, headers: dict[str, str], path: str, body: bytes, repeat: int, status: int
) -> dict[str, Any]:
    durations: list[float] = []
    with httpx.Client(timeout=300) as client, _healthz(base) as latencies:
        for _ in range(repeat):
            began = time.perf_counter()
            reply = client.post(f"{base}{path}", content=body, headers=headers)
            durations.append(time.perf_counter() - began)
            if reply.status_code != status:
                raise SystemExit(f"{path}: expected {status}, got {reply.status_code}: {reply.text[:300]}")
        during = list(latencies)
    return {"request_median_ms": round(1000 * statistics.median(durations), 1), "healthz": _ms(during)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mhr-bench-limits-") as tmp:
        url = f"sqlite+aiosqlite:///{tmp}/mhr.sqlite3"
        migrate.upgrade(url)
        client_id, key = _register(url)
        port = free_port()
        env = {
            "MHR_ENV": "development",
            "MHR_DATABASE_URL": url,
            "MHR_KEYRING_PATH": f"{tmp}/keyring.json",
            "MHR_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
            "MHR_PORT": str(port),
            "MHR_RATE_LIMIT_ENABLED": "false",
            "MHR_LOG_LEVEL": "WARNING",
        }
        argv = [sys.executable, "-m", "service", "serve", "--workers", "1"]
        with running(
            "mhr", argv, port=port, ready_path="/readyz", log_path=Path(tmp) / "server.log", env=env
        ) as server:
            base = server.base_url
            headers = {
                "Content-Type": "application/fhir+json",
                "Authorization": f"Bearer {_token(base, client_id, key)}",
            }
            results: dict[str, Any] = {"cpus": os.cpu_count(), "repeat": args.repeat}
            with _healthz(base) as idle:
                time.sleep(2)
                results["baseline_idle_healthz"] = _ms(list(idle))
            exam = EXAM.read_bytes()
            results["baseline_exam_bundle"] = _measure(base, headers, "/fhir", exam, args.repeat, 200)
            reply = httpx.post(f"{base}/fhir", content=exam, headers=headers, timeout=60).json()
            patient = next(
                e["response"]["location"].split("/")[1]
                for e in reply["entry"]
                if e["response"]["location"].startswith("Patient/")
            )
            for name, build in WORST.items():
                results[f"refused_{name}"] = _measure(
                    base, headers, "/fhir/Observation", build(), args.repeat, 413
                )
            near = _near_limit(patient)
            results["stored_near_value_limit"] = {
                "bytes": len(near),
                **_measure(base, headers, "/fhir/Observation", near, args.repeat, 201),
            }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Work limits on a real server: a worst-case body is refused fast, and the event loop stays free.

A clinic's body of millions of JSON values once held the event loop for 21 s. Now
it is refused with a 413 that names the limit, and ``/healthz`` keeps answering
while that happens. The bound below detects a stalled loop (old main: no answer in
30 s), far above what a loaded CI machine takes to answer; how fast the refusal
and the answers are is measured in bench/body_limits.py, not asserted here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
from e2e_helpers import LiveServer
from mhr_testkit import FHIR_HEADERS

from service.core.settings import Settings

HEALTHZ_BOUND_SECONDS = 2.0
BODY_BYTES = 7 * 1024 * 1024  # under the default 8 MiB byte limit: only the work limits can refuse it
DEFAULTS = Settings()


def _filled(prefix: bytes, item: bytes, suffix: bytes) -> bytes:
    count = (BODY_BYTES - len(prefix) - len(suffix)) // (len(item) + 1)
    return prefix + b",".join([item] * count) + suffix


OBSERVATION = (
    b'{"resourceType":"Observation","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/x"},'
)
WORST_BODIES: dict[str, Callable[[], bytes]] = {
    # The reported case: an Observation with about a million extensions.
    "million-extensions": lambda: _filled(OBSERVATION + b'"extension":[', b'{"url":"x"}', b"]}"),
    # What orjson is slowest to build: millions of empty arrays.
    "empty-arrays": lambda: _filled(OBSERVATION + b'"extension":[', b"[]", b"]}"),
    # The most values per byte.
    "digits": lambda: _filled(OBSERVATION + b'"x":[', b"0", b"]}"),
}


@contextmanager
def healthz_latencies(base_url: str) -> Iterator[list[float]]:
    """Poll /healthz every 10 ms while the block runs; yields the latencies measured so far."""
    latencies: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=base_url, timeout=30) as client:
            while not stop.is_set():
                began = time.perf_counter()
                assert client.get("/healthz").status_code == 200
                latencies.append(time.perf_counter() - began)
                stop.wait(0.01)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        while len(latencies) < 5:  # connected and warm before the body is sent
            time.sleep(0.01)
        latencies.clear()
        yield latencies
    finally:
        stop.set()
        poller.join(timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(WORST_BODIES))
def test_worst_case_body_is_refused_while_healthz_answers(live_server: LiveServer, name: str) -> None:
    clinic = live_server.registry.register("clinic", "clinic")
    headers = {**FHIR_HEADERS, "Authorization": f"Bearer {live_server.token(clinic)}"}
    body = WORST_BODIES[name]()
    assert len(body) <= DEFAULTS.max_request_bytes
    with httpx.Client(timeout=120) as client, healthz_latencies(live_server.base_url) as latencies:
        reply = client.post(f"{live_server.fhir_url}/Observation", content=body, headers=headers)
        during = list(latencies)
    assert reply.status_code == 413, reply.text[:300]
    outcome = reply.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "too-costly"
    assert f"more than {DEFAULTS.max_json_values} JSON values" in outcome["issue"][0]["diagnostics"]
    assert during, "no /healthz answer came while the body was refused"
    assert max(during) < HEALTHZ_BOUND_SECONDS, sorted(during)[-5:]
    # And nothing of it was kept.
    search = httpx.get(f"{live_server.fhir_url}/Observation", headers=headers, timeout=30)
    assert search.json()["total"] == 0

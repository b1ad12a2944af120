"""Per-client rate limits weighted by cost: 429 with Retry-After, audited, configurable."""

from __future__ import annotations

import json
from pathlib import Path

from mhr_testkit import FHIR_HEADERS, Service
from resilience_kit import audit_contents, unique_bundle

from service.http.ratelimit import Costs, RateLimiter


def test_bucket_weights_writes_above_reads() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=1.0, burst=10.0, costs=Costs(read=1, search=2, write=5), clock=lambda: now[0])
    assert limiter.costs.of("POST", "/fhir") == 5
    assert limiter.costs.of("GET", "/fhir/{resource_type}") == 2
    assert limiter.costs.of("POST", "/fhir/{resource_type}/_search") == 2
    assert limiter.costs.of("GET", "/fhir/{resource_type}/{resource_id}") == 1
    assert limiter.charge("a", 5) is None and limiter.charge("a", 5) is None
    assert limiter.charge("a", 5) == 5  # empty: 5 units at 1/s
    assert limiter.charge("b", 1) is None  # per client
    now[0] = 5.0
    assert limiter.charge("a", 5) is None
    assert limiter.wait("a", 5) == 5 and limiter.wait("a", 5) == 5  # wait takes nothing
    assert limiter.wait("never-charged", 5) is None and "never-charged" not in limiter._buckets


def test_limited_requests_get_429_with_retry_after_and_are_audited(database_url: str, tmp_path: Path) -> None:
    overrides = {
        "rate_limit_per_second": 0.5,
        "rate_limit_burst": 12.0,
        "rate_limit_read_cost": 1.0,
        "rate_limit_write_cost": 10.0,
    }
    with Service.start(database_url, tmp_path, **overrides) as service:
        clinic = service.register("clinic", "clinic")
        other = service.register("other clinic", "clinic")
        headers = {**FHIR_HEADERS, **service.headers(clinic)}
        first = service.client.post("/fhir", content=json.dumps(unique_bundle()[0]), headers=headers)
        assert first.status_code == 200
        # 2 units left: a write (10) is refused, two reads (1 each) still pass.
        second = service.client.post("/fhir", content=json.dumps(unique_bundle()[0]), headers=headers)
        assert second.status_code == 429
        assert int(second.headers["retry-after"]) >= 1
        outcome = second.json()
        assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "throttled"
        assert service.client.get("/fhir/Patient", headers=headers).status_code in (200, 429)
        limited = sum(
            service.client.get("/fhir/Patient/x", headers=headers).status_code == 429 for _ in range(5)
        )
        assert limited >= 3
        # Another client is not affected.
        other_headers = {**FHIR_HEADERS, **service.headers(other)}
        assert service.client.get("/fhir/Patient/x", headers=other_headers).status_code == 404
    # Throttled requests are counted, one entry per client, route and minute, written at the
    # latest at shutdown: a client hammering at its limit cannot grow the log by a row a request.
    denials = [c for c in audit_contents(database_url) if c.get("detail", "").startswith("429")]
    assert all(d["agent"]["client"] == clinic.client_id for d in denials)
    assert sum(d["aggregate"]["count"] for d in denials) >= 1 + limited
    routes = {d["route"] for d in denials}
    assert len(denials) <= 2 * len(routes)  # at most two minutes touched per route


def test_limits_can_be_switched_off(database_url: str, tmp_path: Path) -> None:
    with Service.start(database_url, tmp_path, rate_limit_enabled=False) as service:
        assert service.fastapi.state.rate_limiter is None  # type: ignore[attr-defined]

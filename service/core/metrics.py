"""Prometheus metrics. Labels are route templates and status codes only: never ids or values."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "mhr_http_requests_total",
    "HTTP requests by method, route template and status",
    ("method", "route", "status"),
    registry=REGISTRY,
)
LATENCY = Histogram(
    "mhr_http_request_duration_seconds",
    "HTTP request latency by route template",
    ("method", "route"),
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    registry=REGISTRY,
)
TOKENS = Counter(
    "mhr_tokens_total",
    "Token endpoint outcomes",
    ("outcome",),
    registry=REGISTRY,
)
JOBS = Gauge(
    "mhr_jobs",
    "Background jobs by kind and state (done, queued, running, dead), as last counted by this process",
    ("kind", "state"),
    registry=REGISTRY,
)
JOB_RUNS = Counter(
    "mhr_job_runs_total",
    "Job attempts run by this process, by kind and outcome (done, retry, dead, lease_lost)",
    ("kind", "outcome"),
    registry=REGISTRY,
)
INDEX_SUBJECTS = Gauge(
    "mhr_index_migrants",
    "Live migrants by the blind-index key (kid) their tokens are under, as last counted here",
    ("index_key",),
    registry=REGISTRY,
)
SUBJECT_KEYS = Gauge(
    "mhr_subject_keys",
    "Live subject keys by the KEK version that wraps them, as last counted by this process",
    ("kek_version",),
    registry=REGISTRY,
)

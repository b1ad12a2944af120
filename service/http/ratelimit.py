"""Per-client rate limits weighted by cost: a token bucket per client, in cost units.

A read costs least, a search more, a write (which validates, encrypts and indexes a
bundle) most; the weights and the bucket are settings (``MHR_RATE_LIMIT_*``). The
buckets live in this process: with N replicas behind a balancer a client gets up to
N times the configured rate, which bounds abuse without a shared store on the hot path.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from service.core.settings import Settings

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Costs:
    read: float
    search: float
    write: float

    def of(self, method: str, route: str | None) -> float:
        """What one request costs: by method, with POST ``_search`` counted as a search."""
        if method in READ_METHODS:
            if route is not None and _is_search(route):
                return self.search
            return self.read
        if route is not None and route.endswith("/_search"):
            return self.search
        return self.write


def _is_search(route: str) -> bool:
    # "/fhir/{resource_type}" and "/fhir/AuditEvent" are searches, as is $everything; reads name an id.
    if route.endswith("/$everything"):
        return True
    return route.startswith("/fhir/") and route.count("/") == 2 and "metadata" not in route


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets keyed by client; ``charge`` says whether a request may proceed.

    Single-threaded (one event loop per process), so no lock. At most ``max_clients``
    buckets are kept; the least recently used is dropped (it would be nearly full anyway).
    """

    def __init__(
        self,
        *,
        rate: float,
        burst: float,
        costs: Costs,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.costs = costs
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimiter | None:
        if not settings.rate_limit_enabled:
            return None
        return cls(
            rate=settings.rate_limit_per_second,
            burst=settings.rate_limit_burst,
            costs=Costs(
                read=settings.rate_limit_read_cost,
                search=settings.rate_limit_search_cost,
                write=settings.rate_limit_write_cost,
            ),
        )

    def charge(self, key: str, cost: float) -> int | None:
        """Take ``cost`` from ``key``'s bucket: None if allowed, else seconds to wait (>= 1)."""
        return self._take(key, cost, take=True)

    def wait(self, key: str, cost: float) -> int | None:
        """Like ``charge`` but takes nothing: would ``cost`` pass now? Creates no bucket, so that
        keys nobody was ever charged for (an unverified claim) cannot crowd out real ones."""
        if key not in self._buckets:
            return None
        return self._take(key, cost, take=False)

    def _take(self, key: str, cost: float, *, take: bool) -> int | None:
        now = self._clock()
        cost = min(cost, self.burst)  # a request dearer than the burst could never pass otherwise
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(self.burst, now)
            self._buckets[key] = bucket
            if len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        if bucket.tokens >= cost:
            if take:
                bucket.tokens -= cost
            return None
        return max(1, math.ceil((cost - bucket.tokens) / self.rate))


@dataclass(frozen=True)
class TokenEndpointLimits:
    """The token endpoint's limits: every request per source address; issued tokens per client.

    The per-client bucket is charged only for tokens issued (checked before the assertion is
    verified, by its unverified ``iss``): assertions that fail never drain a client's bucket,
    so nobody can lock a client out by sending bad assertions in its name.
    """

    per_address: RateLimiter
    per_client: RateLimiter

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenEndpointLimits | None:
        if not settings.rate_limit_enabled:
            return None
        unit = Costs(read=1.0, search=1.0, write=1.0)
        return cls(
            per_address=RateLimiter(
                rate=settings.token_rate_per_address_per_second,
                burst=settings.token_rate_per_address_burst,
                costs=unit,
            ),
            per_client=RateLimiter(
                rate=settings.token_rate_per_client_per_second,
                burst=settings.token_rate_per_client_burst,
                costs=unit,
            ),
        )

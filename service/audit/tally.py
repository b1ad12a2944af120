"""Refusals of unidentified callers (and throttled ones), counted instead of written one by one.

An unauthenticated flood would otherwise write a full entry per request (about
1 KB each at the rate the service can refuse). Here like refusals are counted
per key (source address or client, route template, status, reason) and minute;
a background task writes one entry per key and minute once the minute is over,
with the count and the first and last instant, and shutdown writes what is left.

Growth is bounded: at most ``max_keys`` keys per minute; refusals past that are
counted under one overflow key per minute (address "*"), so an attacker with
many addresses adds at most ``max_keys`` entries a minute. What a crash loses:
the counts of the current minute and of any minute not yet flushed (at most
about a minute and the flush interval); no clinical data is involved, and the
access log keeps a line for every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from service.audit.events import Action, Aggregate, AuditAgent, AuditRecord, EventType, Outcome

log = logging.getLogger(__name__)

MAX_KEYS_PER_MINUTE = 10_000
FLUSH_INTERVAL_SECONDS = 10.0
OVERFLOW_ADDRESS = "*"


@dataclass(frozen=True)
class RefusalKey:
    client_id: str | None  # set for a throttled, identified client; else None
    address: str | None
    route: str
    method: str
    status: int
    reason: str


@dataclass
class _Count:
    count: int
    first: datetime
    last: datetime


def _instant(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class RefusalTally:
    def __init__(self, *, max_keys: int = MAX_KEYS_PER_MINUTE, clock: Callable[[], datetime] | None = None):
        self.max_keys = max_keys
        self._clock = clock or (lambda: datetime.now(UTC))
        self._minutes: dict[datetime, dict[RefusalKey, _Count]] = {}

    def add(self, key: RefusalKey) -> None:
        now = self._clock()
        minute = now.replace(second=0, microsecond=0)
        counts = self._minutes.setdefault(minute, {})
        if key not in counts and len(counts) >= self.max_keys:
            key = RefusalKey(None, OVERFLOW_ADDRESS, "*", key.method, key.status, "overflow")
        found = counts.get(key)
        if found is None:
            counts[key] = _Count(1, now, now)
        else:
            found.count += 1
            found.last = now

    def take(self, *, everything: bool = False) -> list[AuditRecord]:
        """The entries of every minute that is over (``everything``: the current one too)."""
        current = self._clock().replace(second=0, microsecond=0)
        records: list[AuditRecord] = []
        for minute in sorted(self._minutes):
            if minute >= current and not everything:
                continue
            for key, count in self._minutes.pop(minute).items():
                records.append(_record(key, count))
        return records


def _record(key: RefusalKey, count: _Count) -> AuditRecord:
    token = key.route == "/auth/token"
    return AuditRecord(
        event_type=EventType.login if token else EventType.rest,
        subtype="token" if token else "refusals",
        action=Action.execute,
        outcome=Outcome.serious_failure if key.status >= 500 else Outcome.minor_failure,
        agent=AuditAgent(key.client_id, None, None, address=key.address),
        detail=f"{key.status} {key.method}: {key.reason}"[:200],
        route=key.route,
        aggregate=Aggregate(count.count, _instant(count.first), _instant(count.last)),
    )


async def run_flusher(
    tally: RefusalTally,
    write: Callable[[list[AuditRecord]], Awaitable[None]],
    *,
    interval: float = FLUSH_INTERVAL_SECONDS,
) -> None:
    """Write the finished minutes every ``interval`` seconds; at cancellation, everything."""
    try:
        while True:
            await asyncio.sleep(interval)
            await _flush(tally, write, everything=False)
    finally:
        await _flush(tally, write, everything=True)


async def _flush(
    tally: RefusalTally, write: Callable[[list[AuditRecord]], Awaitable[None]], *, everything: bool
) -> None:
    records = tally.take(everything=everything)
    if not records:
        return
    try:
        await write(records)
    except Exception as exc:
        # Lost, and said so: these are counts of refusals, nothing took effect.
        log.error(
            "aggregated refusal entries could not be written",
            extra={"error_type": type(exc).__name__, "entries": len(records)},
        )


async def stop_flusher(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

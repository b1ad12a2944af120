"""Re-wrapping subject keys under the current KEK, one batch of migrants at a time.

A batch is the migrants after a cursor (subject id order) whose key is wrapped under a version
below the target, read from ``subjects.kek_version``. Each is unwrapped and wrapped again in a
worker thread (an HSM round trip must not stall the event loop), then written back only if the
row still holds the blob that was read: a key erased or rewrapped meanwhile is left as it is.
Reads and writes go on throughout: until the old version is retired, both blobs unwrap.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from security.envelope import IntegrityError
from security.keys import KekRetired, KeyProvider
from security.sealed_headers import headers_kek_version, rewrapped_headers
from service.records.subject_keys import kek_version_of, rewrapped
from service.store.tables import Subject, SubscriptionRow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchOutcome:
    rewrapped: int
    # Keys that did not unwrap (under a retired version, or failing their integrity check): left.
    unreadable: int
    # The last subject id looked at; None when there was nothing after the cursor.
    last_subject_id: str | None


def _needs_rewrap(target: int) -> ColumnElement[bool]:
    return or_(Subject.kek_version.is_(None), Subject.kek_version < target)


async def rewrap_batch(
    session: AsyncSession, keys: KeyProvider, *, target: int, after: str, limit: int
) -> BatchOutcome:
    """Rewrap up to ``limit`` subject keys under a version below ``target``, ids after ``after``."""
    rows = (
        await session.execute(
            select(Subject.id, Subject.wrapped_key)
            .where(Subject.id > after, Subject.wrapped_key.is_not(None), _needs_rewrap(target))
            .order_by(Subject.id)
            .limit(limit)
        )
    ).all()
    if not rows:
        return BatchOutcome(0, 0, None)
    pairs = [(row.id, bytes(row.wrapped_key)) for row in rows]
    results = await asyncio.to_thread(_rewrap_all, keys, pairs)
    done = unreadable = 0
    for (subject_id, old), new in zip(pairs, results, strict=True):
        if new is None:
            unreadable += 1
            continue
        await session.execute(
            update(Subject)
            .where(Subject.id == subject_id, Subject.wrapped_key == old)
            .values(wrapped_key=new, kek_version=kek_version_of(new))
        )
        done += 1
    return BatchOutcome(done, unreadable, pairs[-1][0])


def _rewrap_all(keys: KeyProvider, pairs: list[tuple[str, bytes]]) -> list[bytes | None]:
    out: list[bytes | None] = []
    for subject_id, wrapped in pairs:
        try:
            out.append(rewrapped(keys, subject_id, wrapped))
        except KekRetired:
            # Reported by `mhr keys status` (under_retired_versions); pseudonymous id only.
            log.error(
                "subject key under a retired KEK version",
                extra={"event": "kek-retired", "subject_id": subject_id},
            )
            out.append(None)
        except IntegrityError:
            log.error(
                "subject key failed its integrity check",
                extra={"event": "integrity", "subject_id": subject_id},
            )
            out.append(None)
    return out


async def subscription_headers_per_version(session: AsyncSession) -> dict[int, int]:
    """Sealed subscription channel headers per KEK version of their data key (read from each
    blob's clear header: subscriptions are few, and no column records it)."""
    counts: dict[int, int] = {}
    for blob in (
        await session.execute(
            select(SubscriptionRow.headers_sealed).where(SubscriptionRow.headers_sealed.is_not(None))
        )
    ).scalars():
        if blob is None:
            continue
        version = headers_kek_version(bytes(blob))
        counts[version] = counts.get(version, 0) + 1
    return counts


async def rewrap_subscription_headers(
    session: AsyncSession, keys: KeyProvider, *, target: int
) -> BatchOutcome:
    """Re-wrap the data key of every subscription's sealed headers under a version below ``target``.

    Done by the last batch of a rewrap run, in its transaction; a row is written back only if it
    still holds the blob that was read (a PUT meanwhile sealed it afresh, under the current KEK).
    """
    rows = [
        (row.id, bytes(row.headers_sealed))
        for row in await session.execute(
            select(SubscriptionRow.id, SubscriptionRow.headers_sealed).where(
                SubscriptionRow.headers_sealed.is_not(None)
            )
        )
        if row.headers_sealed is not None
    ]
    stale = [(sid, blob) for sid, blob in rows if headers_kek_version(blob) < target]
    results = await asyncio.to_thread(_rewrap_headers, keys, stale)
    done = unreadable = 0
    for (subscription_id, old), new in zip(stale, results, strict=True):
        if new is None:
            unreadable += 1
            continue
        await session.execute(
            update(SubscriptionRow)
            .where(SubscriptionRow.id == subscription_id, SubscriptionRow.headers_sealed == old)
            .values(headers_sealed=new)
        )
        done += 1
    return BatchOutcome(done, unreadable, None)


def _rewrap_headers(keys: KeyProvider, rows: list[tuple[str, bytes]]) -> list[bytes | None]:
    out: list[bytes | None] = []
    for subscription_id, blob in rows:
        try:
            out.append(rewrapped_headers(keys, subscription_id, blob))
        except IntegrityError:  # KekRetired included: reported by `mhr keys status`
            log.error(
                "subscription headers that do not unwrap",
                extra={"event": "integrity", "subscription_id": subscription_id},
            )
            out.append(None)
    return out

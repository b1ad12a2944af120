"""The contract between publishing an event and delivering it: the ``subscription-delivery`` job.

:func:`service.subscriptions.events.publish` enqueues one job per subscription and transaction,
in the transaction that wrote the events; the job kind and its handler belong to the delivery
worker (service.subscriptions.delivery), which sends every pending event of the subscription in
order of event number, whichever job it runs under.
"""

from __future__ import annotations

import logging
import secrets

from sqlalchemy.ext.asyncio import AsyncSession

from service.jobs import enqueue
from service.jobs.kinds import JobKind, JobPayload, UnknownJobKind, load_kinds

log = logging.getLogger(__name__)

DELIVERY_KIND = "subscription-delivery"


class DeliveryPayload(JobPayload):
    """Deliver what is pending for this subscription (its id only: no PHI in jobs)."""

    subscription_id: str


def _delivery_kind() -> JobKind[JobPayload] | None:
    try:
        return load_kinds().get(DELIVERY_KIND)
    except UnknownJobKind:
        if not _warned:
            _warned.append(True)  # once per process: every write would say it again
            log.warning("no subscription delivery worker installed: events kept for $events only")
        return None


_warned: list[bool] = []


async def enqueue_delivery(session: AsyncSession, subscription_id: str) -> int | None:
    """Queue delivery of the subscription's pending events, for a transaction that publishes.

    One job per transaction, under a key of its own: queued before the transaction numbers its
    events (the numbering locks the subscription's counter until COMMIT, so nothing else should
    follow it), and whichever job runs delivers every pending event. Without the delivery kind in
    this installation, events are still kept for ``$events``.
    """
    kind = _delivery_kind()
    if kind is None:
        return None
    return await enqueue(
        session,
        kind,
        DeliveryPayload(subscription_id=subscription_id),
        f"{subscription_id}:publish:{secrets.token_hex(8)}",
    )


async def enqueue_handshake(session: AsyncSession, subscription_id: str, version_id: int) -> int | None:
    """Queue the delivery job that handshakes a subscription just (re)requested: the worker finds
    it ``requested`` and sends the handshake before any event. Keyed by the subscription's version."""
    kind = _delivery_kind()
    if kind is None:
        return None
    return await enqueue(
        session, kind, DeliveryPayload(subscription_id=subscription_id), f"{subscription_id}:v{version_id}"
    )

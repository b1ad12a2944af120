"""Subscription events for an intake: what its write made visible to whom, and withdrawal notices.

Loaded by service.records.write_observers, in the intake's transaction.
"""

from __future__ import annotations

from datetime import datetime

from service.records.repository import RecordRepository
from service.records.write_observers import CommittedWrite, WriteObserver
from service.subscriptions.changes import WriteWatch


class SubscriptionEvents:
    def __init__(self) -> None:
        self._watch: WriteWatch | None = None

    async def before_grants(self, repo: RecordRepository, subjects: frozenset[str], at: datetime) -> None:
        self._watch = await WriteWatch.begin(repo.session, subjects, at)

    async def after_grants(self, write: CommittedWrite) -> None:
        if self._watch is None:
            raise RuntimeError("after_grants without before_grants")
        await self._watch.finish(write.repo.session, write.written, dict(write.consent_versions), write.agent)


def observer() -> WriteObserver:
    return SubscriptionEvents()

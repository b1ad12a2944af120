"""Work other features do inside an intake's transaction, without records importing them.

Subscriptions (events for what a write made visible, withdrawal notices) and follow-up tasks
(a case per disclosed classification) must happen in the same transaction as the write that
causes them, yet both packages build on records (the grant predicate, the repository), so
records may not import them back. Each such feature offers an observer; records names their
modules here, as the job registry (service.jobs.kinds) names its job modules, and loads them
once on first use. An observer is made per intake, sees the grants before and after their
recomputation, and writes through the intake's session.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import TYPE_CHECKING, Protocol

from service.audit.events import AuditAgent

if TYPE_CHECKING:
    from service.records.context import RecordServices
    from service.records.repository import RecordRepository
    from service.records.subject_keys import OpenedKeys

# Each module defines ``observer() -> WriteObserver``; the order is the order they run in.
BUILTIN_MODULES = ("service.tasks.intake_observer", "service.subscriptions.intake_observer")


@dataclass(frozen=True)
class Written:
    """A version the write created."""

    resource_type: str
    resource_id: str
    version_id: int
    subject_id: str


@dataclass(frozen=True)
class CommittedWrite:
    """What one intake wrote, once its grants are recomputed (still inside its transaction)."""

    services: RecordServices
    repo: RecordRepository
    keys: OpenedKeys
    written: Sequence[Written]
    consent_versions: Mapping[str, int]  # the current version of every Consent written, by id
    agent: AuditAgent
    at: datetime


class WriteObserver(Protocol):
    async def before_grants(self, repo: RecordRepository, subjects: frozenset[str], at: datetime) -> None:
        """Before the grants of ``subjects`` (whose Consents the write changed) are recomputed."""

    async def after_grants(self, write: CommittedWrite) -> None:
        """After the grants are recomputed, in the same transaction."""


class _Factory(Protocol):
    def __call__(self) -> WriteObserver: ...


@cache
def _factories() -> tuple[_Factory, ...]:
    return tuple(importlib.import_module(name).observer for name in BUILTIN_MODULES)


def new_observers() -> list[WriteObserver]:
    """Fresh observers for one intake."""
    return [make() for make in _factories()]

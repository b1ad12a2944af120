"""Job kinds: a name, a typed payload, a handler and a retry policy, in one registry."""

from __future__ import annotations

import importlib
import random
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict
from sqlalchemy.ext.asyncio import AsyncSession

from service.core.settings import SettingsError

if TYPE_CHECKING:
    from service.runtime.providers import Runtime

# Kinds that ship with the service; settings.job_modules adds more.
BUILTIN_MODULES = (
    "service.records.relabel_job",
    "service.keys.rewrap_job",
    "service.keys.reindex_job",
    "service.bulk.jobs",
    "service.jobs.purge",
    "service.tasks.overdue_job",
    "service.subscriptions.delivery",
    "service.subscriptions.heartbeat",
)


class JobPayload(BaseModel):
    """A job's parameters: pseudonymous ids and plain values only (see service.jobs on PHI)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


P = TypeVar("P", bound=JobPayload)


class JobError(Exception):
    """A failure whose message is written for operators (no PHI): kept with the job."""


class PermanentJobError(JobError):
    """A failure that another attempt cannot cure: the job goes dead at once."""


@dataclass(frozen=True)
class JobContext(Generic[P]):
    """What a handler gets: its payload, and what it needs to make its effect happen once."""

    job_id: int
    kind: str
    idempotency_key: str
    attempt: int  # 1 for the first run; a repeat after a crash or failure has a higher one
    payload: P
    runtime: Runtime


Handler = Callable[[JobContext[P], AsyncSession], Awaitable[None]]


class JobSteps(Protocol):
    """Short transactions for a handler that must not hold one open across slow work (a POST to
    a peer): each step first renews the job's lease, row-locked, for ``hold_seconds`` (raising
    LeaseLost when another worker owns the job now), then commits on leaving the block."""

    def step(self, hold_seconds: float) -> AbstractAsyncContextManager[AsyncSession]: ...


StepHandler = Callable[[JobContext[P], JobSteps], Awaitable[None]]


@dataclass(frozen=True)
class JobKind(Generic[P]):
    """One kind of job.

    ``run`` is called inside the transaction that marks the job done (service.jobs): whatever it
    writes through the session commits with the completion or not at all. It must not commit.

    ``run_in_steps`` instead (a kind whose work includes something slow outside the database):
    the handler commits step by step through :class:`JobSteps` and the worker marks the job done
    in a transaction of its own afterwards. A worker killed in between leaves the job to be run
    again from the top, so each step must be safe to repeat after any earlier one committed.
    """

    name: str
    payload_type: type[P]
    run: Handler[P] | None = None
    run_in_steps: StepHandler[P] | None = None
    max_attempts: int = 8
    backoff_base_seconds: float = 5.0
    backoff_cap_seconds: float = 3600.0
    _rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.run is None) == (self.run_in_steps is None):
            raise ValueError(f"job kind {self.name!r} needs exactly one of run and run_in_steps")

    def backoff(self, attempt: int) -> float:
        """Seconds before attempt ``attempt + 1``: exponential, capped, with jitter (half to full),
        so that jobs that failed together do not come back together."""
        ceiling = min(self.backoff_cap_seconds, self.backoff_base_seconds * 2.0 ** (attempt - 1))
        return ceiling * (0.5 + self._rng.random() / 2)


class UnknownJobKind(LookupError):
    pass


class JobRegistry:
    def __init__(self) -> None:
        self._kinds: dict[str, JobKind[JobPayload]] = {}

    def register(self, kind: JobKind[P]) -> JobKind[P]:
        existing = self._kinds.get(kind.name)
        if existing is not None and existing is not kind:
            raise ValueError(f"job kind {kind.name!r} is registered twice")
        self._kinds[kind.name] = kind  # type: ignore[assignment]
        return kind

    def get(self, name: str) -> JobKind[JobPayload]:
        try:
            return self._kinds[name]
        except KeyError:
            raise UnknownJobKind(name) from None

    def names(self) -> list[str]:
        return sorted(self._kinds)


REGISTRY = JobRegistry()


def register(kind: JobKind[P]) -> JobKind[P]:
    """Add a kind to the process's registry (called at import of the module that defines it)."""
    return REGISTRY.register(kind)


def load_kinds(extra_modules: Iterable[str] = ()) -> JobRegistry:
    """Import the modules that define kinds, so that every kind this process runs is registered."""
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    for module in extra_modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise SettingsError(f"MHR_JOB_MODULES: cannot import {module!r} ({type(exc).__name__})") from None
    return REGISTRY

"""How far a KEK rotation has come: subject keys per KEK version, counted from the database."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from security.keys import KekLifecycle, KeyProvider
from service.core.metrics import SUBJECT_KEYS
from service.store.tables import Subject

# The label of subject keys whose KEK version was never recorded (should not happen after 0007).
UNKNOWN_VERSION = "unknown"


@dataclass(frozen=True)
class KekStatus:
    current: int
    min_decrypt: int
    held: tuple[int, ...]
    # Live (not erased) subject keys per KEK version; None: not recorded.
    per_version: dict[int | None, int]
    # Subscriptions' sealed channel headers per KEK version of their data key.
    headers_per_version: dict[int, int] = field(default_factory=dict)

    @property
    def headers_stale(self) -> int:
        """Sealed subscription headers still to rewrap."""
        return sum(n for v, n in self.headers_per_version.items() if v < self.current)

    def headers_below(self, version: int) -> int:
        return sum(n for v, n in self.headers_per_version.items() if v < version)

    @property
    def stale(self) -> int:
        """Subject keys still to rewrap: under a version older than the current one."""
        return sum(n for v, n in self.per_version.items() if v is None or v < self.current)

    @property
    def under_retired(self) -> int:
        """Subject keys under a retired (destroyed) version: unreadable until that key is restored."""
        return sum(n for v, n in self.per_version.items() if v is not None and v < self.min_decrypt)

    def as_json(self) -> dict[str, object]:
        return {
            "current_kek_version": self.current,
            "min_decrypt_version": self.min_decrypt,
            "held_kek_versions": list(self.held),
            "subject_keys_per_kek_version": {
                (UNKNOWN_VERSION if v is None else str(v)): n
                for v, n in sorted(self.per_version.items(), key=lambda item: (item[0] is None, item[0] or 0))
            },
            "to_rewrap": self.stale,
            "under_retired_versions": self.under_retired,
            "subscription_headers_per_kek_version": {
                str(v): n for v, n in sorted(self.headers_per_version.items())
            },
            "subscription_headers_to_rewrap": self.headers_stale,
            "subscription_headers_under_retired_versions": self.headers_below(self.min_decrypt),
        }


async def subject_keys_per_version(session: AsyncSession) -> dict[int | None, int]:
    rows = await session.execute(
        select(Subject.kek_version, func.count())
        .where(Subject.wrapped_key.is_not(None))
        .group_by(Subject.kek_version)
    )
    return {version: int(count) for version, count in rows.all()}


async def kek_status(session: AsyncSession, keys: KeyProvider) -> KekStatus:
    current = keys.current_kek().version
    if isinstance(keys, KekLifecycle):
        min_decrypt, held = keys.min_decrypt_version(), keys.kek_versions()
    else:
        min_decrypt, held = 1, (current,)
    from service.keys.rewrap import subscription_headers_per_version

    return KekStatus(
        current,
        min_decrypt,
        held,
        await subject_keys_per_version(session),
        await subscription_headers_per_version(session),
    )


async def under_retired_versions(session: AsyncSession, keys: KeyProvider) -> int:
    """Live subject keys under a KEK version ``keys`` no longer holds: one indexed count.

    As this process's provider knows its versions: a retirement by another process is taken up
    on this process's next rotation, rewrap or unwrap under a retired version.
    """
    if not isinstance(keys, KekLifecycle):
        return 0
    found = await session.execute(
        select(func.count())
        .select_from(Subject)
        .where(Subject.wrapped_key.is_not(None), Subject.kek_version < keys.min_decrypt_version())
    )
    return int(found.scalar_one())


_seen_labels: set[str] = set()


async def refresh_subject_key_metric(session: AsyncSession) -> None:
    """Set ``mhr_subject_keys{kek_version}``; a version that has emptied reads 0, not its last count."""
    found = {
        (UNKNOWN_VERSION if v is None else str(v)): n
        for v, n in (await subject_keys_per_version(session)).items()
    }
    for label in _seen_labels - found.keys():
        SUBJECT_KEYS.labels(label).set(0)
    for label, count in found.items():
        SUBJECT_KEYS.labels(label).set(count)
    _seen_labels.update(found)

"""Which blind-index key indexes what, while one key replaces another (``mhr keys rotate-index``).

Every migrant's index tokens (the search tokens and match keys of their resources, the label
tokens of their versions and grants) are under one key, named by ``subjects.index_key_id``; the
database's ``index_key_state`` row names the key new migrants get (``current``) and, while a
rotation is under way, the one being left (``previous``). So:

* a write indexes a migrant under that migrant's key (a new one under ``current``): the label
  tokens of a migrant's versions and grants, compared with each other, always agree;
* a lookup (search, ``ifNoneExist``, an idempotent retry) computes its tokens under every key
  in use and asks for any of them. Tokens under two keys never collide (2**-128), so the answer
  is exact while migrants move from one key to the other, with no "switch" moment at which a
  reader could miss a migrant not yet moved (or already moved);
* a ``keys.reindex`` job moves one migrant at a time, in one transaction, re-deriving their
  tokens from the decrypted resources (service.keys.index_rotation).

Each process reads the state row at start and every :data:`REFRESH_SECONDS`; a rotation lets
that long pass (twice) before any migrant moves (``SETTLE_SECONDS``), so no reader still
computes its tokens under the previous key alone when the first migrant leaves it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from security.blind_index import BlindIndexer
from security.keys import KekLifecycle, KeyProvider
from service.store.tables import IndexKeyState

log = logging.getLogger(__name__)

STATE_ROW = 1
REFRESH_SECONDS = 1.0
# How long after a rotation starts before migrants move: every process has re-read the state.
SETTLE_SECONDS = 3 * REFRESH_SECONDS


def settled(phase: IndexPhase, now: datetime) -> bool:
    """Whether every process has had time to take a rotation up (re-read the state)."""
    return phase.changed_at is None or now >= phase.changed_at + timedelta(seconds=SETTLE_SECONDS)


class UnknownIndexKey(Exception):
    """A blind-index key id the key provider does not hold (the message names the id only)."""


@dataclass(frozen=True)
class IndexPhase:
    current: str
    previous: str | None = None
    changed_at: datetime | None = None

    @property
    def rotating(self) -> bool:
        return self.previous is not None


async def read_phase(session: AsyncSession, keys: KeyProvider) -> IndexPhase:
    """The recorded phase; before any rotation, the provider's one index key."""
    row = await session.get(IndexKeyState, STATE_ROW)
    if row is None:
        return IndexPhase(keys.blind_index_kid())
    return IndexPhase(row.current_kid, row.previous_kid, row.changed_at)


class IndexKeys:
    """The blind indexers of the keys in use, by kid, as this process last read the state."""

    def __init__(self, keys: KeyProvider) -> None:
        self._keys = keys
        self._indexers: dict[str, BlindIndexer] = {}
        self._phase = IndexPhase(keys.blind_index_kid())

    @property
    def phase(self) -> IndexPhase:
        return self._phase

    def _indexer(self, kid: str) -> BlindIndexer:
        found = self._indexers.get(kid)
        if found is None:
            keys = self._keys

            def mac(message: bytes) -> bytes:
                out = keys.blind_index_mac_for(kid, message)
                if out is None:
                    raise UnknownIndexKey(f"no blind-index key {kid!r} is held")
                return out

            found = self._indexers[kid] = BlindIndexer(mac, kid=kid)
        return found

    def held(self, kid: str) -> bool:
        return kid in self._keys.blind_index_kids()

    def adopt(self, phase: IndexPhase) -> None:
        """Take up ``phase``; reloads the provider for a key it does not hold yet (another
        process rotated it). UnknownIndexKey if the current key is still not held."""
        held = set(self._keys.blind_index_kids())
        wanted = {phase.current, *([phase.previous] if phase.previous else [])}
        if not wanted <= held and isinstance(self._keys, KekLifecycle):
            self._keys.reload()
            held = set(self._keys.blind_index_kids())
        if phase.current not in held:
            raise UnknownIndexKey(f"no blind-index key {phase.current!r} is held")
        self._phase = phase

    async def refresh(self, session: AsyncSession) -> IndexPhase:
        self.adopt(await read_phase(session, self._keys))
        return self._phase

    def _previous_held(self) -> str | None:
        previous = self._phase.previous
        return previous if previous is not None and previous in self._keys.blind_index_kids() else None

    @property
    def write(self) -> BlindIndexer:
        """The indexer of new migrants (and of what belongs to none: idempotency keys, cursors).

        The previous key until the rotation has settled: a process that has not yet re-read the
        state looks new migrants up under that key alone, and must find them.
        """
        phase = self._phase
        if not settled(phase, datetime.now(UTC)) and self._previous_held() is not None:
            assert phase.previous is not None
            return self._indexer(phase.previous)
        return self._indexer(phase.current)

    @property
    def live(self) -> tuple[BlindIndexer, ...]:
        """Every indexer a lookup computes its tokens under; the one new rows use first."""
        first = self.write
        other = self._previous_held() if first.kid == self._phase.current else self._phase.current
        return (first,) if other is None else (first, self._indexer(other))

    def for_kid(self, kid: str | None) -> BlindIndexer:
        """The indexer of a migrant whose tokens are under ``kid`` (None: written before kids
        were recorded, which a rotation names first, so it is the one key in use)."""
        if kid is None:
            return self._indexer(self._phase.previous or self._phase.current)
        return self._indexer(kid)

"""Access-token signing key rotation: a new key signs, the old one verifies until its tokens expire.

``rotate_token_key`` makes a new key current in the provider and records when
the previous one stopped signing. ``retire_token_key`` destroys a previous key,
and refuses while a token signed under it could still be unexpired: every token
lives ``token_lifetime_seconds`` at most, so that is ``superseded_at`` plus the
lifetime plus a margin for clock skew between replicas. A process started
before the rotation keeps signing under the old key until it restarts, so the
README asks for a (rolling) restart right after the rotation; the margin does
not cover a process left running for longer than that.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select

from security.keys import TOKEN_PURPOSE, KeyProvider, KeyringError
from service.store.database import Database
from service.store.tables import KeyCheck, KeyRotation

# Replicas' clocks may disagree a little about when a token expires.
CLOCK_SKEW = timedelta(seconds=60)


class RotationRefused(Exception):
    """A rotation step is not safe now; the message says why and when it will be."""


@dataclass(frozen=True)
class TokenKeyRotation:
    previous: str
    current: str
    retire_after: datetime


def retire_after(superseded_at: datetime, token_lifetime_seconds: int) -> datetime:
    return superseded_at + timedelta(seconds=token_lifetime_seconds) + CLOCK_SKEW


async def rotate_token_key(
    database: Database, keys: KeyProvider, *, token_lifetime_seconds: int, now: datetime
) -> TokenKeyRotation:
    """Make a new token key current; the previous one keeps verifying the tokens it signed."""
    previous = keys.token_key_id()
    async with database.transaction() as session:
        # The key first: if it cannot be made, nothing is recorded. If the record then fails to
        # commit, the previous key has no supersession time and retiring it is refused (safe).
        current = keys.rotate_secret(TOKEN_PURPOSE)
        row = await session.get(KeyRotation, (TOKEN_PURPOSE, previous))
        if row is None:
            row = KeyRotation(purpose=TOKEN_PURPOSE, key_id=previous, active_from=now)
            session.add(row)
        row.superseded_at = now
        session.add(KeyRotation(purpose=TOKEN_PURPOSE, key_id=current, active_from=now))
    return TokenKeyRotation(previous, current, retire_after(now, token_lifetime_seconds))


async def retire_token_key(
    database: Database, keys: KeyProvider, kid: str, *, token_lifetime_seconds: int, now: datetime
) -> None:
    """Destroy token key ``kid`` once no unexpired token can carry it; RotationRefused before."""
    if kid == keys.token_key_id():
        raise RotationRefused(f"token key {kid} is the current one: rotate first (`mhr keys rotate-token`)")
    async with database.transaction() as session:
        row = await session.get(KeyRotation, (TOKEN_PURPOSE, kid))
        if row is None or row.superseded_at is None:
            raise RotationRefused(
                f"no rotation away from token key {kid} is recorded, so its tokens' expiry is unknown"
            )
        if row.retired_at is not None:
            return
        safe_from = retire_after(row.superseded_at, token_lifetime_seconds)
        if now < safe_from:
            raise RotationRefused(
                f"tokens signed under {kid} may be valid until {safe_from.isoformat(timespec='seconds')}; "
                "retire it after that"
            )
        row.retired_at = now
        # The keyring no longer holds it, so the database must stop expecting it at start-up.
        await session.execute(
            delete(KeyCheck).where(KeyCheck.purpose == TOKEN_PURPOSE, KeyCheck.key_id == kid)
        )
        if keys.holds_token_key(kid):  # a retry after a failed commit finds it gone already
            try:
                keys.retire_secret(TOKEN_PURPOSE, kid)
            except KeyringError as exc:
                raise RotationRefused(str(exc)) from None


async def token_key_history(database: Database) -> list[KeyRotation]:
    async with database.reading() as session:
        rows = await session.execute(
            select(KeyRotation).where(KeyRotation.purpose == TOKEN_PURPOSE).order_by(KeyRotation.active_from)
        )
        return list(rows.scalars().all())

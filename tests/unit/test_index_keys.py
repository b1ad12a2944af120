"""Which index keys a process computes under while one replaces another, and the cursors sealed
under each (service.records.index_keys, service.records.paging); a real keyring file."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from security.keys import BLIND_INDEX_PURPOSE, LocalKeyring
from service.domain.errors import Invalid
from service.records import index_keys
from service.records.index_keys import IndexKeys, IndexPhase, UnknownIndexKey
from service.records.paging import CursorScope, PageCursor, PagePosition, decode_cursor, encode_cursor

SCOPE = CursorScope("client-1", "Patient", [("identifier", "x")])
AT = datetime(2026, 1, 1, tzinfo=UTC)


def _rotated(tmp_path: Path) -> tuple[LocalKeyring, IndexKeys, str, str]:
    keyring = LocalKeyring.create(tmp_path / "keyring.json")
    keys = IndexKeys(keyring)
    old = keyring.blind_index_kid()
    new = keyring.rotate_secret(BLIND_INDEX_PURPOSE)
    return keyring, keys, old, new


def test_new_rows_stay_under_the_old_key_until_the_rotation_settles_and_lookups_use_both(
    tmp_path: Path,
) -> None:
    _keyring, keys, old, new = _rotated(tmp_path)
    # Before any rotation is recorded: the provider's one key... which a rotation made the newest.
    keys.adopt(IndexPhase(old))
    assert [i.kid for i in keys.live] == [old]
    keys.adopt(IndexPhase(new, old, datetime.now(UTC)))
    assert keys.write.kid == old  # not settled: a process not yet told looks up under old alone
    assert [i.kid for i in keys.live] == [old, new]
    keys.adopt(IndexPhase(new, old, datetime.now(UTC) - timedelta(seconds=index_keys.SETTLE_SECONDS + 1)))
    assert keys.write.kid == new and [i.kid for i in keys.live] == [new, old]
    # The two keys index the same identifier differently; a migrant row names its own.
    a, b = (keys.for_kid(k).identifier("urn:passport", "AB 123") for k in (old, new))
    assert a != b and keys.for_kid(None).kid == old


def test_a_key_id_the_provider_does_not_hold_is_refused(tmp_path: Path) -> None:
    _keyring, keys, old, _new = _rotated(tmp_path)
    with pytest.raises(UnknownIndexKey, match="deadbeef"):
        keys.adopt(IndexPhase("deadbeef", old, AT))
    with pytest.raises(UnknownIndexKey, match="cafe0000"):
        keys.for_kid("cafe0000").identifier("urn:passport", "AB 123")


def test_a_retired_previous_key_drops_out_of_lookups(tmp_path: Path) -> None:
    keyring, keys, old, new = _rotated(tmp_path)
    keys.adopt(IndexPhase(new, old, AT))
    keyring.retire_secret(BLIND_INDEX_PURPOSE, old)
    # A process still holding the rotating phase no longer computes under the destroyed key.
    assert [i.kid for i in keys.live] == [new]


def test_cursors_under_the_previous_key_open_until_retire_unless_they_carry_identifiers(
    tmp_path: Path,
) -> None:
    _keyring, keys, old, new = _rotated(tmp_path)
    previous, current = keys.for_kid(old), keys.for_kid(new)
    plain = PageCursor(PagePosition(AT, "p-1"), 3)
    hidden = PageCursor(PagePosition(AT, "p-1"), 3, (("identifier", (b"\x01" * 16,)),))
    sealed_plain = encode_cursor(previous, plain, SCOPE)
    sealed_hidden = encode_cursor(previous, hidden, SCOPE)
    # During the rotation (current first, previous second).
    assert decode_cursor((current, previous), sealed_plain, SCOPE) == plain
    with pytest.raises(Invalid, match="issued before the search index key changed"):
        decode_cursor((current, previous), sealed_hidden, SCOPE)
    # Sealed under the current key: opens, identifiers and all.
    assert decode_cursor((current, previous), encode_cursor(current, hidden, SCOPE), SCOPE) == hidden
    # After retire: only the current key is in use.
    with pytest.raises(Invalid, match="not a cursor of this search"):
        decode_cursor((current,), sealed_plain, SCOPE)

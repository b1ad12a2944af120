"""Sealed tokens (search cursors): opaque, bound to their context, unlinkable, tamper-evident."""

from __future__ import annotations

import os

import pytest

from security.blind_index import BlindIndexer
from security.sealed_tokens import TokenSealer

KEY = os.urandom(32)


def test_a_token_opens_only_in_its_context() -> None:
    sealer = TokenSealer(KEY)
    token = sealer.seal(b"passport N014782936", b"client-a")
    assert b"N014782936" not in token
    assert sealer.open(token, b"client-a") == b"passport N014782936"
    with pytest.raises(ValueError):
        sealer.open(token, b"client-b")
    with pytest.raises(ValueError):
        TokenSealer(os.urandom(32)).open(token, b"client-a")


def test_tokens_of_one_plaintext_look_unrelated() -> None:
    sealer = TokenSealer(KEY)
    assert sealer.seal(b"same", b"ctx") != sealer.seal(b"same", b"ctx")


@pytest.mark.parametrize("position", [0, 1, 13, -1])
def test_any_edited_byte_is_refused(position: int) -> None:
    sealer = TokenSealer(KEY)
    token = bytearray(sealer.seal(b"payload", b"ctx"))
    token[position] ^= 0x01
    with pytest.raises(ValueError):
        sealer.open(bytes(token), b"ctx")
    with pytest.raises(ValueError):
        sealer.open(b"\x01short", b"ctx")


def test_derived_keys_are_separate_from_indexes_and_each_other() -> None:
    indexer = BlindIndexer(KEY)
    cursor_key = indexer.derived_key("search-cursor.v2")
    assert len(cursor_key) == 32
    assert cursor_key == BlindIndexer(KEY).derived_key("search-cursor.v2")
    assert cursor_key != indexer.derived_key("search-cursor.v3")
    assert cursor_key[:16] != indexer.token("search-cursor.v2", "x", "y")

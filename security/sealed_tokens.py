"""Short tokens the service hands a client and takes back, opaque to the client.

A search cursor, for one, names the search it continues, and a search by
identifier must not put the identifier into the next link's URL, even as a
MACed value that anyone can read. Such tokens are sealed with AES-256-GCM under
a key of their own, bound to the context they are good for (the associated
data), with a fresh random nonce each: two tokens for the same search cannot
be told to be alike.

Format (version 1): ``0x01 || nonce (12) || ciphertext || tag (16)``. Every
failure to open one is the same ``ValueError``.
"""

from __future__ import annotations

import os
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["TokenSealer"]

_FORMAT: Final = b"\x01"
_NONCE: Final = 12
_TAG: Final = 16
_KEY: Final = 32


class TokenSealer:
    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != _KEY:
            raise ValueError("token sealing key must be 32 bytes")
        self._aead = AESGCM(bytes(key))

    def __repr__(self) -> str:
        return "TokenSealer()"

    def seal(self, plaintext: bytes, context: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return _FORMAT + nonce + self._aead.encrypt(nonce, plaintext, _FORMAT + context)

    def open(self, token: bytes, context: bytes) -> bytes:
        """The plaintext of a token sealed for exactly ``context``; ValueError for any other."""
        if len(token) < 1 + _NONCE + _TAG or token[:1] != _FORMAT:
            raise ValueError("not a sealed token")
        try:
            return self._aead.decrypt(token[1 : 1 + _NONCE], token[1 + _NONCE :], _FORMAT + context)
        except InvalidTag:
            raise ValueError("not a sealed token") from None

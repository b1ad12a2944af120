"""Envelope encryption of resources under a per-subject key.

Each migrant (the *subject*) has one random 32-byte subject key, wrapped by the
key provider's KEK (see ``security.keys``). Every resource version belonging to
that subject is sealed with AES-256-GCM under the subject key. Destroying the
subject key (erasure) makes every version and every backup of that subject's
resources unreadable.

Blob format (version 1), all integers big-endian::

    offset  size  field
    0       3     magic b"MHR"
    3       1     format version (1)
    4       1     algorithm (1 = AES-256-GCM, 128-bit tag)
    5       4     subject key version (uint32)
    9       12    nonce (random, fresh for every message)
    21      n+16  ciphertext || tag

The 9-byte header is authenticated: the GCM associated data is
``header || aad``, so a blob whose header was edited (to claim another key
version, say) fails its tag. The caller's ``aad`` is rebuilt from the row's own
columns with :func:`resource_aad`, so a ciphertext copied to another row, to
another version of the same resource or to another subject fails too.

Random 96-bit nonces are safe for well under 2**32 messages per key (NIST
SP 800-38D, section 8.3); one subject's records are orders of magnitude fewer.

Every failure to open a blob raises the same :class:`IntegrityError` with the
same message: callers log it as an integrity event, and nothing downstream can
learn whether the header, the key, the AAD or the tag was wrong.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "ALG_AES_256_GCM",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "KEY_SIZE",
    "MAGIC",
    "NONCE_SIZE",
    "TAG_SIZE",
    "IntegrityError",
    "SubjectCipher",
    "ciphertext_digest",
    "new_data_key",
    "peek_key_version",
    "resource_aad",
]

MAGIC: Final = b"MHR"
FORMAT_VERSION: Final = 1
ALG_AES_256_GCM: Final = 1
KEY_SIZE: Final = 32
NONCE_SIZE: Final = 12
TAG_SIZE: Final = 16

_HEADER: Final = struct.Struct(">3sBBI")
HEADER_SIZE: Final = _HEADER.size  # 9
_MIN_BLOB: Final = HEADER_SIZE + NONCE_SIZE + TAG_SIZE
_UINT32_MAX: Final = 0xFFFF_FFFF
_UINT64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF

# Distinguishes this AAD encoding from any other byte string an AEAD in this
# code base might authenticate, and lets the encoding change later.
_AAD_DOMAIN: Final = b"mhr.resource-aad.v1"

_INTEGRITY_MESSAGE: Final = "ciphertext failed its integrity check"


class IntegrityError(Exception):
    """A ciphertext (or wrapped key) could not be opened.

    The message is always the same, whatever went wrong, so that neither logs
    nor API responses act as an oracle on the format, the key or the tag.
    """

    def __init__(self) -> None:
        super().__init__(_INTEGRITY_MESSAGE)


def new_data_key() -> bytes:
    """Return a fresh random 32-byte key (AES-256) from the OS CSPRNG."""
    return os.urandom(KEY_SIZE)


def _field(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + raw


def resource_aad(resource_type: str, resource_id: str, version_id: int, subject_id: str) -> bytes:
    """Associated data binding a ciphertext to one row.

    Every string is length-prefixed (uint32) and the version is a fixed-width
    uint64, so no two different tuples encode to the same bytes: with plain
    concatenation ("Obs", "ervation1") and ("Observation", "1") would collide.
    """
    if not 0 <= version_id <= _UINT64_MAX:
        raise ValueError("version_id must fit in an unsigned 64-bit integer")
    return b"".join(
        (
            _field(_AAD_DOMAIN),
            _field(resource_type.encode("utf-8")),
            _field(resource_id.encode("utf-8")),
            struct.pack(">Q", version_id),
            _field(subject_id.encode("utf-8")),
        )
    )


def peek_key_version(blob: bytes) -> int:
    """Subject key version named in a blob's header, for choosing the key.

    The value is unauthenticated until :meth:`SubjectCipher.open` succeeds;
    it only selects which key to try. Raises :class:`IntegrityError` when the
    blob is not a well-formed version-1 blob.
    """
    return _parse_header(blob)


def _parse_header(blob: bytes) -> int:
    if len(blob) < _MIN_BLOB:
        raise IntegrityError
    magic, fmt, alg, key_version = _HEADER.unpack_from(blob)
    if magic != MAGIC or fmt != FORMAT_VERSION or alg != ALG_AES_256_GCM:
        raise IntegrityError
    return int(key_version)


class SubjectCipher:
    """Seals and opens one subject's resources under one subject key version.

    Holds a single ``AESGCM`` object: building one costs a few microseconds
    (key schedule), which adds up when a bundle of hundreds of resources is
    decrypted. The raw key is not kept as an attribute.
    """

    __slots__ = ("_aead", "_header", "_key_version")

    def __init__(self, key: bytes, key_version: int) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError("subject key must be 32 bytes")
        if not 0 <= key_version <= _UINT32_MAX:
            raise ValueError("key_version must fit in an unsigned 32-bit integer")
        self._aead = AESGCM(bytes(key))
        self._key_version = key_version
        # The header is the same for every blob this cipher seals.
        self._header = _HEADER.pack(MAGIC, FORMAT_VERSION, ALG_AES_256_GCM, key_version)

    @property
    def key_version(self) -> int:
        return self._key_version

    def __repr__(self) -> str:
        return f"SubjectCipher(key_version={self._key_version})"

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt ``plaintext`` bound to ``aad`` (see :func:`resource_aad`)."""
        nonce = os.urandom(NONCE_SIZE)
        sealed = self._aead.encrypt(nonce, plaintext, self._header + aad)
        return self._header + nonce + sealed

    def open(self, blob: bytes, aad: bytes) -> bytes:
        """Decrypt a blob sealed for exactly this ``aad`` and key version.

        Raises :class:`IntegrityError` for any malformed, truncated, foreign
        or tampered blob; the cause is deliberately not chained.
        """
        if _parse_header(blob) != self._key_version:
            raise IntegrityError
        header = blob[:HEADER_SIZE]
        nonce = blob[HEADER_SIZE : HEADER_SIZE + NONCE_SIZE]
        try:
            return self._aead.decrypt(nonce, blob[HEADER_SIZE + NONCE_SIZE :], header + aad)
        except InvalidTag:
            raise IntegrityError from None


def ciphertext_digest(blob: bytes) -> str:
    """Hex SHA-256 of a blob: the audit log records what was stored, not what it says."""
    return hashlib.sha256(blob).hexdigest()

"""Channel headers, sealed: a rest-hook's headers usually carry the receiver's own secret.

Envelope encryption through the key provider's operations (keys never leave it): a fresh data
key per sealing, wrapped by the KEK with the subscription's id as associated data, and the
headers (a JSON list) sealed under it with AES-256-GCM (security.envelope). A blob copied to
another subscription fails to open. Headers are never logged and never answered back in clear:
a read shows each header's name with its value masked (see :data:`MASK`).

Blob: 2-byte big-endian length of the wrapped key, the wrapped key, the sealed headers.
"""

from __future__ import annotations

import struct

import orjson

from security.envelope import SubjectCipher, new_data_key
from security.keys import KeyProvider

# A read shows "Name: ***"; a PUT that sends a header back exactly so keeps its stored value,
# so that read-modify-write clients do not wipe the secret they were never shown.
MASK = "***"
_FORMAT = 1


def _aad(subscription_id: str) -> bytes:
    return b"mhr-subscription-headers\x00" + subscription_id.encode()


def seal_headers(keys: KeyProvider, subscription_id: str, headers: list[str]) -> bytes | None:
    if not headers:
        return None
    data_key = new_data_key()
    wrapped = keys.wrap_key(data_key, _aad(subscription_id))
    sealed = SubjectCipher(data_key, _FORMAT).seal(orjson.dumps(headers), _aad(subscription_id))
    return struct.pack(">H", len(wrapped)) + wrapped + sealed


def open_headers(keys: KeyProvider, subscription_id: str, blob: bytes | None) -> list[str]:
    """The headers in clear, for the delivery worker only (raises IntegrityError if tampered)."""
    if not blob:
        return []
    (length,) = struct.unpack_from(">H", blob, 0)
    wrapped, sealed = blob[2 : 2 + length], blob[2 + length :]
    data_key = keys.unwrap_key(wrapped, _aad(subscription_id))
    headers = orjson.loads(SubjectCipher(data_key, _FORMAT).open(sealed, _aad(subscription_id)))
    return [str(h) for h in headers]


def header_name(header: str) -> str:
    return header.split(":", 1)[0].strip()


def masked(headers: list[str]) -> list[str]:
    return [f"{header_name(h)}: {MASK}" for h in headers]

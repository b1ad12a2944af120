"""Subscription channel headers, sealed: the blob and its crypto (service.subscriptions.headers
uses it; the KEK rewrap, service.keys, re-wraps its data key without opening the headers).

Envelope encryption through the key provider's operations (keys never leave it): a fresh data
key per sealing, wrapped by the KEK with the subscription's id as associated data, and the
headers (a JSON list) sealed under it with AES-256-GCM (security.envelope). A blob copied to
another subscription fails to open.

Blob: 2-byte big-endian length of the wrapped key, the wrapped key, the sealed headers.
"""

from __future__ import annotations

import struct

import orjson

from security.envelope import SubjectCipher, new_data_key
from security.keys import KeyProvider, parse_wrapped

__all__ = ["headers_kek_version", "open_sealed_headers", "rewrapped_headers", "seal_headers"]

_FORMAT = 1


def _aad(subscription_id: str) -> bytes:
    return b"mhr-subscription-headers\x00" + subscription_id.encode()


def _split(blob: bytes) -> tuple[bytes, bytes]:
    (length,) = struct.unpack_from(">H", blob, 0)
    return blob[2 : 2 + length], blob[2 + length :]


def seal_headers(keys: KeyProvider, subscription_id: str, headers: list[str]) -> bytes | None:
    if not headers:
        return None
    data_key = new_data_key()
    wrapped = keys.wrap_key(data_key, _aad(subscription_id))
    sealed = SubjectCipher(data_key, _FORMAT).seal(orjson.dumps(headers), _aad(subscription_id))
    return struct.pack(">H", len(wrapped)) + wrapped + sealed


def open_sealed_headers(keys: KeyProvider, subscription_id: str, blob: bytes | None) -> list[str]:
    """The headers in clear (raises IntegrityError if tampered)."""
    if not blob:
        return []
    wrapped, sealed = _split(blob)
    data_key = keys.unwrap_key(wrapped, _aad(subscription_id))
    headers = orjson.loads(SubjectCipher(data_key, _FORMAT).open(sealed, _aad(subscription_id)))
    return [str(h) for h in headers]


def headers_kek_version(blob: bytes) -> int:
    """The KEK version wrapping a blob's data key (its clear header; nothing is decrypted)."""
    return parse_wrapped(_split(blob)[0])[0].version


def rewrapped_headers(keys: KeyProvider, subscription_id: str, blob: bytes) -> bytes:
    """The same sealed headers with their data key wrapped again under the current KEK (a KEK
    rotation's rewrap); the headers themselves are not opened. IntegrityError if it does not unwrap."""
    wrapped, sealed = _split(blob)
    aad = _aad(subscription_id)
    again = keys.wrap_key(keys.unwrap_key(wrapped, aad), aad)
    return struct.pack(">H", len(again)) + again + sealed

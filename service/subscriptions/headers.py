"""Channel headers, sealed: a rest-hook's headers usually carry the receiver's own secret.

The blob and its envelope encryption are security.sealed_headers (the KEK rewrap re-wraps their
data key too). Headers are never logged and never answered back in clear: a read shows each
header's name with its value masked (see :data:`MASK`).
"""

from __future__ import annotations

from security.keys import KeyProvider
from security.sealed_headers import open_sealed_headers, seal_headers

__all__ = ["MASK", "header_name", "masked", "open_headers", "seal_headers"]

# A read shows "Name: ***"; a PUT that sends a header back exactly so keeps its stored value,
# so that read-modify-write clients do not wipe the secret they were never shown.
MASK = "***"


def open_headers(keys: KeyProvider, subscription_id: str, blob: bytes | None) -> list[str]:
    """The headers in clear, for the delivery worker only (raises IntegrityError if tampered)."""
    return open_sealed_headers(keys, subscription_id, blob)


def header_name(header: str) -> str:
    return header.split(":", 1)[0].strip()


def masked(headers: list[str]) -> list[str]:
    return [f"{header_name(h)}: {MASK}" for h in headers]

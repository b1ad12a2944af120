"""Blind indexes: exact-match search over encrypted identifiers.

An identifier (passport number, case number) is stored encrypted with its
resource; next to it the database keeps ``HMAC-SHA256(index_key, input)``
truncated to 16 bytes, where the input is the domain, the identifier system
and the normalised value. A search computes the same index from the query and
looks it up; the database never sees the value.

What a 16-byte truncated HMAC index leaks, to someone holding the database but
not the index key:

* **Equality within the deployment.** Two rows with the same index hold the
  same (normalised) identifier in the same system: an attacker learns which
  records belong to the same person, and how often each value occurs
  (frequency), which for a common coded value can hint at what it is.
* **Nothing across deployments.** Each deployment has its own random index key,
  so the same passport gives unrelated indexes in two databases; they cannot
  be joined.
* **No offline brute force without the key.** Passport and case numbers have
  little entropy and could be enumerated, but every guess needs the key; the
  HMAC is the only barrier, so the key lives in the key provider, never in the
  database. With the key, low-entropy values *are* recoverable by enumeration.
* **Collisions are negligible.** 128 bits: two different values share an
  index with probability about ``n**2 / 2**129`` for ``n`` values.

Only identifiers and, through :meth:`BlindIndexer.token`, coded values chosen
for search are indexed; no diagnosis or result is indexed on its own.
"""

from __future__ import annotations

import hashlib
import hmac
import unicodedata
from collections.abc import Callable
from typing import Final

__all__ = ["BlindIndexer", "normalise_identifier"]

_MIN_KEY: Final = 32
_MIN_SIZE: Final = 8
_MAX_SIZE: Final = 32
_IDENTIFIER_DOMAIN: Final = b"identifier\x00"
_TOKEN_DOMAIN: Final = b"token\x00"
_DERIVE_DOMAIN: Final = b"derive\x00"

# Bounded because each pass can only shrink or recompose the string; a few
# passes reach the fixed point for everything seen, the bound guards the rest.
_MAX_PASSES: Final = 8


def _is_separator(ch: str) -> bool:
    # Whitespace, any dash (Unicode Pd: hyphen-minus, U+2010, en dash...), full stops, and
    # invisible format characters (zero-width space, soft hyphen, BOM) that
    # copy-paste drags in from documents.
    return ch.isspace() or ch == "." or unicodedata.category(ch) in ("Pd", "Cf")


def _pass(value: str) -> str:
    folded = unicodedata.normalize("NFKC", value).casefold()
    kept = "".join(ch for ch in folded if not _is_separator(ch))
    # Removing a separator can put a base letter next to a combining mark
    # ("e-\u0301"), and casefold can decompose; normalise again.
    return unicodedata.normalize("NFKC", kept)


def normalise_identifier(system: str, value: str) -> str:
    """Normalise an identifier value so the same identifier, typed differently, matches.

    Applied to the value:

    * Unicode NFKC, so full-width and compatibility forms (full-width
      "AB123", U+FF21...) equal their plain forms;
    * case folding (stronger than lower-casing: "ß" matches "SS");
    * removal of whitespace (anywhere, so surrounding whitespace too), of
      dashes, of dots and of invisible format characters, since people write
      "AB 123-456", "AB.123.456" and "ab123456" for the same passport.

    The steps repeat until the string stops changing, so the result is a
    fixed point: ``normalise_identifier(s, normalise_identifier(s, v))`` equals
    ``normalise_identifier(s, v)``.

    ``system`` (a URI naming the identifier scheme) is not changed by
    normalisation: URIs are case-sensitive. It is part of the signature so that
    per-system rules can be added without changing callers; it must not be
    blank. Raises ValueError if nothing is left of the value.
    """
    if not system.strip():
        raise ValueError("identifier system must not be blank")
    result = value
    for _ in range(_MAX_PASSES):
        nxt = _pass(result)
        if nxt == result:
            break
        result = nxt
    else:
        raise ValueError("identifier value does not normalise to a stable form")
    if not result:
        raise ValueError("identifier value is empty after normalisation")
    return result


def _component(text: str, what: str) -> bytes:
    # The HMAC input separates fields with NUL; forbidding NUL in every field
    # but the last keeps the encoding unambiguous.
    if "\x00" in text:
        raise ValueError(f"{what} must not contain NUL")
    return text.encode("utf-8")


Mac = Callable[[bytes], bytes]


def _keyed_mac(key: bytes) -> Mac:
    if len(key) < _MIN_KEY:
        raise ValueError("blind index key must be at least 32 bytes")
    # Keying HMAC once and copying the state saves hashing the padded key on every call.
    base = hmac.new(bytes(key), digestmod=hashlib.sha256)

    def mac(message: bytes) -> bytes:
        keyed = base.copy()
        keyed.update(message)
        return keyed.digest()

    return mac


class BlindIndexer:
    """Computes blind indexes under one index key (purpose "blind-index").

    The service gives it the key provider's operation (``KeyProvider.blind_index_mac``,
    HMAC-SHA256 under a key that may never leave a token); a raw key (tools, tests) is
    keyed here. Either way the key is not kept as an attribute.
    """

    __slots__ = ("_mac_of", "_size", "kid")

    def __init__(self, key: bytes | Mac, *, size: int = 16, kid: str | None = None) -> None:
        if not _MIN_SIZE <= size <= _MAX_SIZE:
            raise ValueError("blind index size must be between 8 and 32 bytes")
        self._mac_of = _keyed_mac(key) if isinstance(key, bytes | bytearray) else key
        self._size = size
        # The id of the key (service.records.index_keys records which key indexed which rows).
        self.kid = kid

    @property
    def size(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"BlindIndexer(size={self._size}, kid={self.kid!r})"

    def _mac(self, message: bytes) -> bytes:
        return self._mac_of(message)[: self._size]

    def identifier(self, system: str, value: str) -> bytes:
        """Index of an identifier: the system (stripped) and the normalised value."""
        normalised = normalise_identifier(system, value)
        return self._mac(
            _IDENTIFIER_DOMAIN + _component(system.strip(), "system") + b"\x00" + normalised.encode("utf-8")
        )

    def token(self, kind: str, system: str, code: str) -> bytes:
        """Index of a coded value (a FHIR Coding chosen for search).

        ``kind`` separates uses (e.g. "nationality" vs "status") so equal codes
        under different kinds give unrelated indexes. Codes are case-sensitive
        and hyphens can be meaningful (LOINC "8480-6"), so only surrounding
        whitespace is stripped from system and code.
        """
        if not kind:
            raise ValueError("token kind must not be empty")
        system = system.strip()
        code = code.strip()
        if not system or not code:
            raise ValueError("token system and code must not be blank")
        return self._mac(
            _TOKEN_DOMAIN
            + _component(kind, "kind")
            + b"\x00"
            + _component(system, "system")
            + b"\x00"
            + code.encode("utf-8")
        )

    def derived_key(self, purpose: str) -> bytes:
        """A 32-byte key for ``purpose`` (such as sealing search cursors), derived from the
        index key with HMAC-SHA256 as a PRF under a domain of its own: it equals no index,
        and the index key never leaves this object."""
        return self._mac_of(_DERIVE_DOMAIN + purpose.encode("utf-8"))

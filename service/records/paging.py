"""Search paging by position (keyset), with next links that carry an opaque, sealed cursor.

A page after the first starts after the last row of the previous one, in the
search's order ``(last_updated, id)``: its cost does not grow with how far the
client has paged or with the size of the store, and a resource written between
two pages does not shift the rest by one. An offset would make page n cost n
pages, and counting every match again on every page would make each page cost
the whole result.

The cursor holds that position, the total counted on the first page (a
search's total is the number of matches when it started), and the blind
indexes of any identifier the search was made by: the next link names the
search without the identifier (a POST search keeps a passport number out of
URLs, and its next page must too). It is sealed (AES-GCM, security.sealed_tokens)
under a key derived from the service's index key, bound to the client and the
rest of the search: a client can neither read nor edit it, two cursors of one
search look unrelated, and it is good for nothing else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import orjson

from security.blind_index import BlindIndexer
from security.sealed_tokens import TokenSealer
from service.domain.errors import Invalid

_KEY_PURPOSE = "search-cursor.v2"
# Room for the position and the indexes of 50 identifiers (the most one search may name), each
# under both keys of an index key rotation.
_MAX_CURSOR = 8192
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class PagePosition:
    """The sort key of the last row of a page: the next page starts after it."""

    last_updated: datetime
    resource_id: str


TokenGroups = tuple[tuple[str, tuple[bytes, ...]], ...]


@dataclass(frozen=True)
class PageCursor:
    after: PagePosition
    total: int | None
    # Blind-index groups of the search's identifying parameters (kind, alternatives), which
    # its links leave out.
    hidden: TokenGroups = ()


@dataclass(frozen=True)
class CursorScope:
    """What a cursor is good for: this client's search, with these parameters."""

    client_id: str
    resource_type: str
    search: Sequence[tuple[str, str]]

    def binding(self) -> str:
        described = orjson.dumps([self.client_id, self.resource_type, sorted(self.search)])
        return hashlib.sha256(described).hexdigest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sealer(indexer: BlindIndexer) -> TokenSealer:
    return TokenSealer(indexer.derived_key(_KEY_PURPOSE))


def encode_cursor(indexer: BlindIndexer, cursor: PageCursor, scope: CursorScope) -> str:
    micros = (cursor.after.last_updated - _EPOCH) // _MICROSECOND  # exact, unlike a float
    hidden = [[kind, [_b64(token) for token in tokens]] for kind, tokens in cursor.hidden]
    payload = orjson.dumps([micros, cursor.after.resource_id, cursor.total, hidden])
    return _b64(_sealer(indexer).seal(payload, scope.binding().encode()))


def _hidden(value: object) -> TokenGroups:
    if not isinstance(value, list):
        raise ValueError("hidden groups")
    groups = []
    for group in value:
        kind, tokens = group  # a list of two, or ValueError
        if not isinstance(kind, str) or not isinstance(tokens, list):
            raise ValueError("hidden group")
        groups.append((kind, tuple(_unb64(t) for t in tokens if isinstance(t, str))))
    return tuple(groups)


def decode_cursor(
    indexer: BlindIndexer | Sequence[BlindIndexer], token: str, scope: CursorScope
) -> PageCursor:
    """The cursor of a next link, or a 400 if it was edited or belongs to another search.

    ``indexer``: the index keys in use, current first (service.records.index_keys). A cursor
    sealed under the previous key opens until that key is retired; one that carries identifier
    indexes is refused, though: they are under the previous key alone, and would miss the
    migrants already moved to the current one.
    """
    indexers = (indexer,) if isinstance(indexer, BlindIndexer) else tuple(indexer)
    if len(token) <= _MAX_CURSOR:
        for n, sealer in enumerate(indexers):
            try:
                payload = _sealer(sealer).open(_unb64(token), scope.binding().encode())
            except (ValueError, TypeError, binascii.Error):
                continue
            try:
                micros, resource_id, total, hidden = orjson.loads(payload)
                if (
                    isinstance(micros, int)
                    and isinstance(resource_id, str)
                    and (total is None or (isinstance(total, int) and total >= 0))
                ):
                    cursor = PageCursor(
                        PagePosition(_EPOCH + micros * _MICROSECOND, resource_id), total, _hidden(hidden)
                    )
                    if n and cursor.hidden:
                        raise Invalid(
                            "_cursor was issued before the search index key changed: run the search "
                            "again from its first page",
                            expression="_cursor",
                        )
                    return cursor
            except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError, OverflowError):
                pass
            break
    raise Invalid(
        "_cursor is not a cursor of this search: follow the next link as given", expression="_cursor"
    )

"""Search paging by position (keyset), with next links that carry an opaque, signed cursor.

A page after the first starts after the last row of the previous one, in the
search's order ``(last_updated, id)``: its cost does not grow with how far the
client has paged or with the size of the store, and a resource written between
two pages does not shift the rest by one. An offset would make page n cost n
pages, and counting every match again on every page would make each page cost
the whole result.

The cursor holds that position and the total counted on the first page (a
search's total is the number of matches when it started). It is MACed under
the service's index key and bound to the client and the search, so a client
cannot edit it, and it is good for nothing else. It names only a pseudonymous
resource id and a timestamp.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import orjson

from security.blind_index import BlindIndexer
from service.errors import FhirError

_MAC_KIND = "search-cursor.v1"
_MAX_CURSOR = 512
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class PagePosition:
    """The sort key of the last row of a page: the next page starts after it."""

    last_updated: datetime
    resource_id: str


@dataclass(frozen=True)
class PageCursor:
    after: PagePosition
    total: int | None


@dataclass(frozen=True)
class CursorScope:
    """What a cursor is good for: this client's search, with these parameters."""

    client_id: str
    resource_type: str
    search: Sequence[tuple[str, str]]

    def binding(self) -> str:
        described = orjson.dumps([self.client_id, self.resource_type, sorted(self.search)])
        return hashlib.sha256(described).hexdigest()


def encode_cursor(indexer: BlindIndexer, cursor: PageCursor, scope: CursorScope) -> str:
    micros = (cursor.after.last_updated - _EPOCH) // _MICROSECOND  # exact, unlike a float
    payload = base64.urlsafe_b64encode(orjson.dumps([micros, cursor.after.resource_id, cursor.total]))
    text = payload.decode().rstrip("=")
    mac = indexer.token(_MAC_KIND, scope.binding(), text)
    return f"{text}.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"


def decode_cursor(indexer: BlindIndexer, token: str, scope: CursorScope) -> PageCursor:
    """The cursor of a next link, or a 400 if it was edited or belongs to another search."""
    text, _, mac_text = token.partition(".")
    if len(token) <= _MAX_CURSOR and text and mac_text:
        expected = indexer.token(_MAC_KIND, scope.binding(), text)
        try:
            mac = base64.urlsafe_b64decode(mac_text + "=" * (-len(mac_text) % 4))
            valid = hmac.compare_digest(mac, expected)
            micros, resource_id, total = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        except (ValueError, TypeError, orjson.JSONDecodeError):
            valid = False
        total_ok = valid and (total is None or (isinstance(total, int) and total >= 0))
        if total_ok and isinstance(micros, int) and isinstance(resource_id, str):
            return PageCursor(PagePosition(_EPOCH + micros * _MICROSECOND, resource_id), total)
    raise FhirError.single(
        400,
        "invalid",
        "_cursor is not a cursor of this search: follow the next link as given",
        expression="_cursor",
    )

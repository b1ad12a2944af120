"""How many values a JSON text holds, counted on its bytes before anything parses it.

orjson builds a million-node body in a few hundred milliseconds, all of it in C
with the GIL held: in a worker thread that still stalls the event loop (and
``/healthz``) for as long. A body with too many values is therefore refused
before it is parsed, on a count made with ``bytes`` methods alone, slice by
slice, so that no step holds the GIL for more than a millisecond or two and the
count stops as soon as it passes the limit.

The count is exact for valid JSON: every value but the root is either the first
member or item of a non-empty container or follows a comma, so

    values = 1 + commas + containers - empty containers

counting only what lies outside strings. Strings are found by their quotes once
the escapes ``\\\\`` and ``\\"`` are removed. For text that is not valid JSON the
number means nothing; the parser refuses such a body afterwards.
"""

from __future__ import annotations

from typing import Final

# What the count needs: quotes, backslashes and structure. Every other byte becomes "x"
# (so "[1]" stays non-empty), and whitespace goes (so "[ ]" reads as the empty "[]").
_KEPT: Final = frozenset(b'"\\,[]{}')
_TABLE: Final = bytes(byte if byte in _KEPT else ord("x") for byte in range(256))
_WHITESPACE: Final = b" \t\n\r"
_OPENERS: Final = (b"[", b"{")
_CLOSERS: Final = (b"]", b"}")
_SLICE: Final = 256 * 1024


def _slice_end(body: bytes, start: int) -> int:
    """Where the slice from ``start`` ends: past ``_SLICE`` bytes, never inside an escape.

    In valid JSON a backslash begins an escape of one more character (the hex digits of
    ``\\uXXXX`` are plain characters): a slice whose last byte is not a backslash ends
    every escape it began.
    """
    end = start + _SLICE
    while end < len(body):
        window = body[end - 1 : end - 1 + _SLICE]
        backslashes = len(window) - len(window.lstrip(b"\\"))
        if backslashes < len(window):
            return end + backslashes
        end += len(window)
    return len(body)


def _outside_strings(reduced: bytes, inside: bool) -> tuple[bytes, bool]:
    """The structure of a reduced slice outside strings, and whether the slice ends inside one."""
    pieces = reduced.split(b'"')
    # Pieces alternate between outside and inside strings; "x" keeps the outside pieces
    # apart, so that '["a"]' does not join into an empty "[]".
    outside = b"x".join(pieces[1 if inside else 0 :: 2])
    return outside, inside ^ (len(pieces) % 2 == 0)


def _count(body: bytes, stop_above: int) -> int:
    values = 1
    inside = False  # whether the next slice starts inside a string
    opened = False  # whether the last slice ended on "[" or "{" outside a string
    start = 0
    while start < len(body) and values <= stop_above:
        end = _slice_end(body, start)
        reduced = body[start:end].translate(_TABLE, _WHITESPACE)
        start = end
        if not reduced:  # only whitespace: nothing changes
            continue
        if b"\\" in reduced:
            # Pairs first, left to right, as a JSON parser reads them: what is left of
            # "\\\"" is the escaped quote, which must not end the string.
            reduced = reduced.replace(b"\\\\", b"").replace(b'\\"', b"")
        if opened and not inside and reduced[:1] in _CLOSERS:
            values -= 1  # an empty container cut in two by the slice boundary
        outside, ends_inside = _outside_strings(reduced, inside)
        values += (
            outside.count(b",")
            + outside.count(b"[")
            + outside.count(b"{")
            - outside.count(b"[]")
            - outside.count(b"{}")
        )
        opened = not ends_inside and reduced[-1:] in _OPENERS
        inside = ends_inside
    return values


def json_value_count(body: bytes) -> int:
    """The number of values (objects, arrays, strings, numbers, true/false/null) in ``body``."""
    return _count(body, stop_above=len(body) + 1)


def holds_more_values_than(body: bytes, limit: int) -> bool:
    """Whether ``body`` holds more than ``limit`` values, counting no further than needed."""
    # Commas and brackets inside strings only add to this bound: a body under it is done.
    if 1 + body.count(b",") + body.count(b"[") + body.count(b"{") <= limit:
        return False
    return _count(body, stop_above=limit) > limit

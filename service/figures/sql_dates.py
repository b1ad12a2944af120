"""Date arithmetic both databases understand, compiled per dialect.

PostgreSQL subtracts dates to whole days and converts a ``timestamptz`` to its UTC date; SQLite
keeps dates as ISO text and needs ``julianday`` and ``date`` for the same answers.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Date, Integer
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement


class days_between(FunctionElement[int]):
    """``days_between(later, earlier)``: whole days from ``earlier`` to ``later`` (two dates)."""

    type = Integer()
    inherit_cache = True


class utc_date(FunctionElement[Any]):
    """``utc_date(timestamp)``: the calendar date, in UTC, of an aware timestamp."""

    type = Date()
    inherit_cache = True


@compiles(days_between)
def _days_between_default(element: days_between, compiler: SQLCompiler, **kw: Any) -> str:
    later, earlier = list(element.clauses)
    return f"({compiler.process(later, **kw)} - {compiler.process(earlier, **kw)})"


@compiles(days_between, "sqlite")
def _days_between_sqlite(element: days_between, compiler: SQLCompiler, **kw: Any) -> str:
    later, earlier = list(element.clauses)
    return (
        f"CAST(julianday({compiler.process(later, **kw)}) - julianday({compiler.process(earlier, **kw)})"
        " AS INTEGER)"
    )


@compiles(utc_date)
def _utc_date_default(element: utc_date, compiler: SQLCompiler, **kw: Any) -> str:
    (timestamp,) = list(element.clauses)
    return f"CAST(({compiler.process(timestamp, **kw)} AT TIME ZONE 'UTC') AS DATE)"


@compiles(utc_date, "sqlite")
def _utc_date_sqlite(element: utc_date, compiler: SQLCompiler, **kw: Any) -> str:
    # SQLite holds the timestamp as UTC text (service.store.tables.UtcDateTime converts first).
    (timestamp,) = list(element.clauses)
    return f"date({compiler.process(timestamp, **kw)})"

"""The reporting period: FHIR dates in, a half-open range of days out.

``$evaluate-measure`` takes ``periodStart`` and ``periodEnd`` as FHIR ``date``s, and R4 says a
partial date covers all of what it names: ``periodStart=2026`` starts on 1 January,
``periodEnd=2026`` ends on 31 December, included. Inside, the period is ``[start, end)`` so that
the SQL compares with ``>=`` and ``<`` only.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import date, timedelta

_FHIR_DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?", re.ASCII)
# A period longer than this is a mistake rather than a report (and would scan every task).
LONGEST_PERIOD_DAYS = 20 * 366


class PeriodError(ValueError):
    """A period that cannot be reported: the parameter at fault and the rule it breaks."""

    def __init__(self, message: str, parameter: str) -> None:
        super().__init__(message)
        self.parameter = parameter


@dataclass(frozen=True)
class Period:
    start: date  # the first day counted
    end: date  # the day after the last day counted

    @property
    def last_day(self) -> date:
        return self.end - timedelta(days=1)


def _parse(value: str, name: str, *, at_end: bool) -> date:
    match = _FHIR_DATE.fullmatch(value.strip())
    if match is None:
        raise PeriodError(f"{name} must be a FHIR date (YYYY, YYYY-MM or YYYY-MM-DD)", name)
    year, month, day = match.groups()
    try:
        if day is not None:
            return date(int(year), int(month), int(day))
        if month is not None:
            first = date(int(year), int(month), 1)
            return first.replace(day=calendar.monthrange(first.year, first.month)[1]) if at_end else first
        return date(int(year), 12, 31) if at_end else date(int(year), 1, 1)
    except ValueError:
        raise PeriodError(f"{name} is not a date of the calendar", name) from None


def parse_period(period_start: str | None, period_end: str | None) -> Period:
    """The period from ``periodStart`` to ``periodEnd`` (both included), or PeriodError saying why not."""
    for name, value in (("periodStart", period_start), ("periodEnd", period_end)):
        if not value:
            raise PeriodError("periodStart and periodEnd are both required", name)
    assert period_start is not None and period_end is not None
    start = _parse(period_start, "periodStart", at_end=False)
    last = _parse(period_end, "periodEnd", at_end=True)
    if last < start:
        raise PeriodError("periodEnd is before periodStart", "periodEnd")
    if (last - start).days >= LONGEST_PERIOD_DAYS:
        raise PeriodError("the period is longer than 20 years", "periodEnd")
    if last == date.max:
        raise PeriodError("periodEnd is not a date of the calendar", "periodEnd")
    return Period(start, last + timedelta(days=1))

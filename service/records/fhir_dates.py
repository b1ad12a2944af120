"""FHIR date, dateTime and instant values as UTC ranges (a partial date covers a span)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_DATE = re.compile(
    r"^(?P<y>\d{4})(-(?P<m>\d{2})(-(?P<d>\d{2})"
    r"(T(?P<time>\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?)(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


def _add_months(moment: datetime, months: int) -> datetime:
    month = moment.month - 1 + months
    return moment.replace(year=moment.year + month // 12, month=month % 12 + 1)


def parse_range(text: str) -> tuple[datetime, datetime]:
    """[start, end) in UTC of a FHIR date/dateTime; raises ValueError if malformed, or if
    the range does not fit in years 1 to 9999 (``9999-12-31``, ``0001-01-01T00:00+14:00``).

    A date without a time zone is taken as UTC: exams are dated by day, and a
    day's worth of slack is what the search semantics already allow.
    """
    try:
        return _parse_range(text)
    except OverflowError:
        raise ValueError("outside the dates this server represents (years 1 to 9999)") from None


def _parse_range(text: str) -> tuple[datetime, datetime]:
    match = _DATE.match(text.strip())
    if not match:
        raise ValueError("not a FHIR date or dateTime")
    year = int(match["y"])
    if match["m"] is None:
        start = datetime(year, 1, 1, tzinfo=UTC)
        return start, start.replace(year=year + 1)
    month = int(match["m"])
    if match["d"] is None:
        start = datetime(year, month, 1, tzinfo=UTC)
        return start, _add_months(start, 1)
    day = int(match["d"])
    if match["time"] is None:
        start = datetime(year, month, day, tzinfo=UTC)
        return start, start + timedelta(days=1)
    time_text = match["time"]
    if len(time_text) == 5:
        time_text += ":00"
    tz = match["tz"] or "Z"
    moment = datetime.fromisoformat(
        f"{match['y']}-{match['m']}-{match['d']}T{time_text}{tz.replace('Z', '+00:00')}"
    )
    moment = moment.astimezone(UTC)
    precision = timedelta(minutes=1) if len(match["time"]) == 5 else timedelta(seconds=1)
    return moment, moment + precision


def parse_instant(text: str) -> datetime:
    return parse_range(text)[0]

"""The published figures as a FHIR R4 MeasureReport (type summary) against the Measure in fhir/."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from service.figures.counts import (
    GROUP_SYSTEM,
    MEASURE_URL,
    MEASURE_VERSION,
    PROPORTIONS,
    Group,
)
from service.figures.period import Period
from service.figures.suppression import PublishedFigures

POPULATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/measure-population"
DATA_ABSENT_REASON = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
UCUM = "http://unitsofmeasure.org"
# A suppressed count: R4's data-absent-reason "masked" (withheld for privacy), on the element.
_MASKED = {"extension": [{"url": DATA_ABSENT_REASON, "valueCode": "masked"}]}


def _population(code: str, count: int | None) -> dict[str, Any]:
    population: dict[str, Any] = {"code": {"coding": [{"system": POPULATION_SYSTEM, "code": code}]}}
    if count is None:
        population["_count"] = _MASKED
    else:
        population["count"] = count
    return population


def _group_code(group: Group) -> dict[str, Any]:
    return {"coding": [{"system": GROUP_SYSTEM, "code": group.value}]}


def measure_report(
    published: PublishedFigures,
    period: Period,
    reporter: str,
    reporter_name: str | None = None,
    *,
    now: datetime | None = None,
) -> dict[str, Any]:
    """A summary MeasureReport; ``reporter`` is the organization id the figures are about."""
    groups: list[dict[str, Any]] = []
    for group in PROPORTIONS:
        entry: dict[str, Any] = {
            "code": _group_code(group),
            "population": [
                _population("initial-population", published.cases),
                _population("denominator", published.cases),
                _population("numerator", published.counts[group]),
            ],
        }
        score = published.score(group)
        if score is not None:
            entry["measureScore"] = {"value": round(score, 4)}
        groups.append(entry)
    evaluated = published.counts[Group.days_to_evaluation]
    median: dict[str, Any] = {
        "code": _group_code(Group.days_to_evaluation),
        "population": [
            _population("initial-population", published.cases),
            _population("measure-population", evaluated),
            _population("measure-observation", evaluated),
        ],
    }
    if published.median_days is not None:
        median["measureScore"] = {"value": published.median_days, "unit": "d", "system": UCUM, "code": "d"}
    elif published.median_suppressed:
        median["measureScore"] = _MASKED  # a Quantity holding only the reason it is absent
    groups.insert(list(Group).index(Group.days_to_evaluation), median)
    organization: dict[str, Any] = {"reference": f"Organization/{reporter}"}
    if reporter_name:
        organization["display"] = reporter_name
    return {
        "resourceType": "MeasureReport",
        "status": "complete",
        "type": "summary",
        "measure": f"{MEASURE_URL}|{MEASURE_VERSION}",
        "date": (now or datetime.now(UTC)).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "reporter": organization,
        "period": {"start": period.start.isoformat(), "end": period.last_day.isoformat()},
        "improvementNotation": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/measure-improvement-notation",
                    "code": "increase",
                }
            ]
        },
        "group": groups,
    }

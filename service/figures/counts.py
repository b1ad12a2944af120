"""What the figures count: the groups of the Measure and the raw counts of one report."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

MEASURE_URL = "https://mhr.example.org/fhir/Measure/followup-completion"
MEASURE_VERSION = "0.1.0"
MEASURE_ID = "followup-completion"
GROUP_SYSTEM = "https://mhr.example.org/fhir/CodeSystem/followup-completion"


class Group(StrEnum):
    """The groups of fhir/Measure-followup-completion.json (codes of its CodeSystem)."""

    evaluated_30 = "evaluated-30d"
    evaluated_90 = "evaluated-90d"
    evaluated_365 = "evaluated-365d"
    days_to_evaluation = "days-to-evaluation"
    lost = "lost-to-follow-up"
    transferred = "transferred"
    arrival_unknown = "arrival-unknown"
    confirmed = "confirmed"
    revised = "revised"
    not_evaluated = "not-evaluated"


# The proportion groups: a numerator over all cases of the period.
PROPORTIONS: tuple[Group, ...] = tuple(g for g in Group if g is not Group.days_to_evaluation)
# Evaluation windows, in days after the clock start, and the group counting each.
WINDOWS: dict[Group, int] = {Group.evaluated_30: 30, Group.evaluated_90: 90, Group.evaluated_365: 365}


class Perspective(StrEnum):
    """Whose figures: an authority's (the tasks it owns) or a clinic organization's (it requested)."""

    authority = "authority"
    clinic = "clinic"


@dataclass(frozen=True)
class CompletionFigures:
    """The counts of one organization over one period, before suppression. No personal data."""

    cases: int
    evaluated: int  # at any time (the measure-population of days-to-evaluation)
    within: dict[Group, int]  # per evaluation window (WINDOWS)
    median_days: float | None  # None: nobody evaluated
    lost: int
    transferred: int
    arrival_unknown: int
    confirmed: int
    revised: int

    @property
    def not_evaluated(self) -> int:
        return self.cases - self.evaluated

    def numerator(self, group: Group) -> int:
        if group in WINDOWS:
            return self.within[group]
        by_group = {
            Group.lost: self.lost,
            Group.transferred: self.transferred,
            Group.arrival_unknown: self.arrival_unknown,
            Group.confirmed: self.confirmed,
            Group.revised: self.revised,
            Group.not_evaluated: self.not_evaluated,
            Group.days_to_evaluation: self.evaluated,
        }
        return by_group[group]

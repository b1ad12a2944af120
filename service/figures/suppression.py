"""The small-cell rule: no published figure may point at fewer than ``min_cell`` migrants.

A public-health statistician's rule for tables of small counts (the practice of CDC WONDER and
of national statistics offices), applied to every report and chart alike:

1. *Primary*: a count from 1 to ``min_cell - 1`` is suppressed. Zero is shown: "nobody" says
   nothing about a person that the cohort size does not.
2. *Whole report*: when the cases themselves are that few, every figure is suppressed.
3. *Complement*: a count whose complement in the cases (``cases - n``) is from 1 to
   ``min_cell - 1`` is suppressed too, or "18 of 20 evaluated" would say "2 were not".
4. *Nested differences*: evaluated within 30, 90 and 365 days and at all are nested; a count
   that exceeds the previous one shown by 1 to ``min_cell - 1`` is suppressed.
5. *Partitions*: evaluated + not evaluated = cases and confirmed + revised = evaluated; when
   exactly one figure of such a sum is suppressed, so is a second (the smaller part shown), or
   addition or subtraction would undo it.
6. The median days is suppressed when fewer than ``min_cell`` cases were evaluated; a score
   (a proportion) only accompanies a count that is shown.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.figures.counts import PROPORTIONS, WINDOWS, CompletionFigures, Group

# The nested chain of rule 4, smallest first; days_to_evaluation counts the evaluated cases.
_NESTED = (*WINDOWS, Group.days_to_evaluation)
# Rule 5: (total, parts); None as the total stands for the cases.
_PARTITIONS: tuple[tuple[Group | None, tuple[Group, Group]], ...] = (
    (None, (Group.days_to_evaluation, Group.not_evaluated)),
    (Group.days_to_evaluation, (Group.confirmed, Group.revised)),
)


@dataclass(frozen=True)
class PublishedFigures:
    """What may be shown: a count of None is suppressed."""

    min_cell: int
    cases: int | None
    counts: dict[Group, int | None]  # every proportion group, and days_to_evaluation (evaluated)
    median_days: float | None  # None: suppressed, or nobody evaluated (median_suppressed says which)
    median_suppressed: bool

    def score(self, group: Group) -> float | None:
        """The proportion of the cases, where its count is shown (and there are cases)."""
        count = self.counts[group]
        if count is None or not self.cases:
            return None
        return count / self.cases


def suppress(figures: CompletionFigures, min_cell: int) -> PublishedFigures:
    def small(n: int) -> bool:
        return 0 < n < min_cell

    groups = (*PROPORTIONS, Group.days_to_evaluation)
    raw = {g: figures.numerator(g) for g in groups}
    if small(figures.cases):
        return PublishedFigures(min_cell, None, dict.fromkeys(groups), None, figures.evaluated > 0)
    hidden = {g for g, n in raw.items() if small(n) or small(figures.cases - n)}
    shown_before = 0
    for group in _NESTED:
        if group in hidden:
            continue
        if small(raw[group] - shown_before):
            hidden.add(group)
        else:
            shown_before = raw[group]
    # A sum with exactly one unknown member gives it away: hide a second (the smaller shown part).
    changed = True
    while changed:
        changed = False
        for total, parts in _PARTITIONS:
            unknown = [g for g in (total, *parts) if g is not None and g in hidden]
            if len(unknown) == 1:
                hidden.add(min((g for g in parts if g not in hidden), key=raw.__getitem__))
                changed = True
    median_suppressed = figures.evaluated > 0 and (
        figures.evaluated < min_cell or Group.days_to_evaluation in hidden
    )
    return PublishedFigures(
        min_cell,
        figures.cases,
        {g: None if g in hidden else n for g, n in raw.items()},
        None if median_suppressed else figures.median_days,
        median_suppressed,
    )

"""Completion figures without a database: the period, the small-cell rule, the MeasureReport, the chart."""

from __future__ import annotations

import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from datetime import date
from pathlib import Path

import pytest
from fhir.resources.R4B.measurereport import MeasureReport

from service.figures.chart import SVG_NS, render_chart
from service.figures.counts import WINDOWS, CompletionFigures, Group
from service.figures.measure_report import DATA_ABSENT_REASON, measure_report
from service.figures.period import Period, PeriodError, parse_period
from service.figures.suppression import suppress

REPO = Path(__file__).resolve().parents[2]


def figures(
    cases: int = 40,
    evaluated: int = 30,
    within: tuple[int, int, int] = (10, 20, 30),
    *,
    median: float | None = 45.0,
    lost: int = 6,
    transferred: int = 5,
    arrival_unknown: int = 0,
    confirmed: int = 20,
) -> CompletionFigures:
    return CompletionFigures(
        cases=cases,
        evaluated=evaluated,
        within=dict(zip(WINDOWS, within, strict=True)),
        median_days=median,
        lost=lost,
        transferred=transferred,
        arrival_unknown=arrival_unknown,
        confirmed=confirmed,
        revised=evaluated - confirmed,
    )


# --------------------------------------------------------------------------- period


@pytest.mark.parametrize(
    ("start", "end", "first", "after_last"),
    [
        ("2026-01-01", "2026-12-31", date(2026, 1, 1), date(2027, 1, 1)),
        ("2026", "2026", date(2026, 1, 1), date(2027, 1, 1)),
        ("2024-02", "2024-02", date(2024, 2, 1), date(2024, 3, 1)),  # a leap February ends on the 29th
        ("2026-03-05", "2026-03-05", date(2026, 3, 5), date(2026, 3, 6)),  # one day
    ],
)
def test_a_period_covers_its_first_and_last_day(start: str, end: str, first: date, after_last: date) -> None:
    assert parse_period(start, end) == Period(first, after_last)


@pytest.mark.parametrize(
    ("start", "end", "parameter"),
    [
        (None, "2026", "periodStart"),
        ("2026", "", "periodEnd"),
        ("01/02/2026", "2026", "periodStart"),
        ("2026-13", "2026", "periodStart"),
        ("2026", "2026-02-30", "periodEnd"),
        ("2026-05-01", "2026-04-30", "periodEnd"),
        ("1990", "2026", "periodEnd"),  # longer than 20 years
        ("2026-01-01T00:00:00Z", "2026", "periodStart"),  # a date, not a dateTime
        ("\uff12\uff10\uff12\uff16", "2026", "periodStart"),  # fullwidth digits are not FHIR's
        ("0000", "2026", "periodStart"),
        ("2026", "9999", "periodEnd"),
    ],
)
def test_a_bad_period_names_the_parameter(start: str | None, end: str | None, parameter: str) -> None:
    with pytest.raises(PeriodError) as caught:
        parse_period(start, end)
    assert caught.value.parameter == parameter


# --------------------------------------------------------------------------- small cells


def test_figures_that_identify_nobody_are_all_shown() -> None:
    published = suppress(figures(), 5)
    assert published.cases == 40
    assert {g: published.counts[g] for g in WINDOWS} == {
        Group.evaluated_30: 10,
        Group.evaluated_90: 20,
        Group.evaluated_365: 30,
    }
    assert published.counts[Group.not_evaluated] == 10
    assert published.counts[Group.arrival_unknown] == 0  # zero is shown: it says nothing of anyone
    assert published.median_days == 45.0
    assert published.score(Group.evaluated_30) == 0.25


def test_a_count_of_one_to_four_is_suppressed_and_zero_is_not() -> None:
    published = suppress(figures(lost=3, transferred=0), 5)
    assert published.counts[Group.lost] is None
    assert published.score(Group.lost) is None  # a score would give the count back
    assert published.counts[Group.transferred] == 0


def test_a_count_whose_complement_is_small_is_suppressed() -> None:
    # 37 of 40 lost says "3 were not".
    assert suppress(figures(lost=37), 5).counts[Group.lost] is None
    assert suppress(figures(lost=35), 5).counts[Group.lost] == 35


def test_too_few_cases_suppress_the_whole_report() -> None:
    published = suppress(
        figures(cases=4, evaluated=2, within=(1, 2, 2), lost=0, transferred=0, confirmed=1), 5
    )
    assert published.cases is None
    assert set(published.counts.values()) == {None}
    assert published.median_days is None and published.median_suppressed
    assert (
        suppress(
            figures(cases=0, evaluated=0, within=(0, 0, 0), median=None, lost=0, transferred=0, confirmed=0),
            5,
        ).cases
        == 0
    )


def test_nested_windows_never_differ_by_a_small_count() -> None:
    # 90 days exceeds 30 days by 2: "2 were evaluated between 31 and 90 days".
    published = suppress(figures(within=(10, 12, 30)), 5)
    assert published.counts[Group.evaluated_30] == 10
    assert published.counts[Group.evaluated_90] is None
    assert published.counts[Group.evaluated_365] == 30  # 20 more than the last count shown


def test_a_sum_never_gives_a_suppressed_part_away() -> None:
    # Evaluated at all (30) exceeds evaluated within 365 days (28) by 2: suppressed, and then its
    # complement (not evaluated) and one part of confirmed + revised, or they would add up to it.
    published = suppress(figures(within=(10, 20, 28)), 5)
    assert published.counts[Group.days_to_evaluation] is None
    assert published.counts[Group.not_evaluated] is None
    assert [published.counts[Group.confirmed], published.counts[Group.revised]] == [20, None]
    assert published.median_days is None and published.median_suppressed
    # A small part of a shown total takes the other part with it.
    published = suppress(figures(confirmed=27), 5)
    assert published.counts[Group.revised] is None and published.counts[Group.confirmed] is None
    assert published.counts[Group.days_to_evaluation] == 30


def test_the_median_of_few_evaluations_is_suppressed() -> None:
    few = figures(cases=20, evaluated=4, within=(0, 4, 4), lost=0, transferred=0, confirmed=0)
    published = suppress(few, 5)
    assert published.median_days is None and published.median_suppressed
    nobody = suppress(figures(cases=20, evaluated=0, within=(0, 0, 0), median=None, confirmed=0), 5)
    assert nobody.median_days is None and not nobody.median_suppressed  # none to report


def test_a_threshold_of_one_suppresses_nothing() -> None:
    published = suppress(figures(lost=1, within=(1, 2, 30)), 1)
    assert published.counts[Group.lost] == 1 and published.counts[Group.evaluated_30] == 1


# --------------------------------------------------------------------------- MeasureReport and chart


def _report(published_lost: int = 3) -> dict[str, object]:
    published = suppress(figures(lost=published_lost), 5)
    return measure_report(published, parse_period("2026", "2026"), "org-a", "Authority A")


def _group(report: dict[str, object], code: str) -> dict[str, object]:
    groups = report["group"]
    assert isinstance(groups, list)
    return next(g for g in groups if g["code"]["coding"][0]["code"] == code)


def test_the_measure_report_is_a_valid_summary_with_masked_counts() -> None:
    report = _report()
    MeasureReport.model_validate(report)
    assert (report["type"], report["status"]) == ("summary", "complete")
    assert report["measure"] == "https://mhr.example.org/fhir/Measure/followup-completion|0.1.0"
    assert report["period"] == {"start": "2026-01-01", "end": "2026-12-31"}
    assert report["reporter"] == {"reference": "Organization/org-a", "display": "Authority A"}
    within_30 = _group(report, "evaluated-30d")
    assert [p.get("count") for p in within_30["population"]] == [40, 40, 10]
    assert within_30["measureScore"] == {"value": 0.25}
    lost = _group(report, "lost-to-follow-up")
    numerator = lost["population"][2]
    assert "count" not in numerator and "measureScore" not in lost
    assert numerator["_count"] == {"extension": [{"url": DATA_ABSENT_REASON, "valueCode": "masked"}]}
    median = _group(report, "days-to-evaluation")
    assert median["measureScore"] == {
        "value": 45.0,
        "unit": "d",
        "system": "http://unitsofmeasure.org",
        "code": "d",
    }
    measure = json.loads((REPO / "fhir" / "Measure-followup-completion.json").read_text())
    assert [g["code"]["coding"][0]["code"] for g in report["group"]] == [g["id"] for g in measure["group"]]


@pytest.mark.skipif(
    shutil.which("node") is None
    or not (REPO / "tools" / "ig" / "node_modules" / "@medplum" / "core").is_dir(),
    reason="the independent validator is installed by `make ig-tools`",
)
def test_the_measure_report_passes_the_independent_validator(tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text(json.dumps(_report()))
    done = subprocess.run(
        ["node", str(REPO / "tools" / "ig" / "validate.mjs"), "--json", str(tmp_path / "report.json")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert list(json.loads(done.stdout).values()) == [[]], done.stdout


def test_the_chart_is_svg_with_labelled_bars_and_the_period() -> None:
    published = suppress(figures(lost=3), 5)
    svg = render_chart(
        published, parse_period("2026", "2026"), 'Authority <A> & "B"', generated=date(2027, 1, 2)
    )
    root = ET.fromstring(svg)  # noqa: S314 - our own output
    assert root.tag == f"{{{SVG_NS}}}svg"
    texts = [t.text or "" for t in root.iter(f"{{{SVG_NS}}}text")]
    assert 'Follow-up completion: Authority <A> & "B"' in texts  # escaped on the way out, whole on the way in
    assert any("2026-01-01 to 2026-12-31" in t for t in texts)
    assert {
        "evaluated ≤ 30 days",
        "evaluated ≤ 90 days",
        "evaluated ≤ 365 days",
        "lost to follow-up",
        "transferred",
    } <= set(texts)
    assert "10 (25%)" in texts and "suppressed" in texts  # lost (3) is drawn as suppressed
    assert "3" not in texts

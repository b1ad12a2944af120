"""The published figures as an SVG bar chart an operator can open in a browser.

Written with the standard library's ElementTree (which escapes every text it writes), so the
service needs no plotting dependency. Bars: evaluated within 30, 90 and 365 days, lost to
follow-up and transferred, each as a share of the cases, labelled with its count; a suppressed
figure is drawn as an outlined empty bar labelled "suppressed". Counts and names of
organizations only: nothing about a migrant is in the figures to begin with.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import date

from service.figures.counts import Group
from service.figures.period import Period
from service.figures.suppression import PublishedFigures

SVG_NS = "http://www.w3.org/2000/svg"
BARS: tuple[tuple[Group, str], ...] = (
    (Group.evaluated_30, "evaluated ≤ 30 days"),
    (Group.evaluated_90, "evaluated ≤ 90 days"),
    (Group.evaluated_365, "evaluated ≤ 365 days"),
    (Group.lost, "lost to follow-up"),
    (Group.transferred, "transferred"),
)
_WIDTH, _HEIGHT = 720, 420
_LEFT, _TOP, _PLOT_W, _PLOT_H = 70, 80, 620, 240
_COLOURS = {
    Group.evaluated_30: "#1b7837",
    Group.evaluated_90: "#5aae61",
    Group.evaluated_365: "#a6dba0",
    Group.lost: "#c2a5cf",
    Group.transferred: "#9970ab",
}


def _text(parent: ET.Element, x: float, y: float, text: str, **attributes: str) -> None:
    element = ET.SubElement(parent, "text", {"x": f"{x:g}", "y": f"{y:g}", **attributes})
    element.text = text


def _period_label(period: Period) -> str:
    return f"{period.start.isoformat()} to {period.last_day.isoformat()}"


def render_chart(
    published: PublishedFigures, period: Period, reporter_name: str, *, generated: date | None = None
) -> bytes:
    svg = ET.Element(
        "svg",
        {
            "xmlns": SVG_NS,
            "width": str(_WIDTH),
            "height": str(_HEIGHT),
            "viewBox": f"0 0 {_WIDTH} {_HEIGHT}",
            "font-family": "sans-serif",
            "font-size": "13",
            "role": "img",
        },
    )
    title = f"Follow-up completion: {reporter_name}"
    ET.SubElement(svg, "title").text = f"{title}, {_period_label(period)}"
    ET.SubElement(svg, "rect", {"width": "100%", "height": "100%", "fill": "#ffffff"})
    _text(svg, _LEFT, 30, title, **{"font-size": "18", "font-weight": "bold"})
    cases = (
        "suppressed (fewer than the small-cell threshold)"
        if published.cases is None
        else str(published.cases)
    )
    median = _median_label(published)
    _text(
        svg,
        _LEFT,
        54,
        f"Clock starts {_period_label(period)} · cases {cases} · median days to evaluation {median}",
    )
    # Axis: 0-100 % of the cases, gridlines every 25 %.
    for step in range(5):
        y = _TOP + _PLOT_H - _PLOT_H * step / 4
        ET.SubElement(
            svg,
            "line",
            {
                "x1": str(_LEFT),
                "x2": str(_LEFT + _PLOT_W),
                "y1": f"{y:g}",
                "y2": f"{y:g}",
                "stroke": "#dddddd",
            },
        )
        _text(svg, _LEFT - 8, y + 4, f"{step * 25}%", **{"text-anchor": "end", "fill": "#555555"})
    slot = _PLOT_W / len(BARS)
    for index, (group, label) in enumerate(BARS):
        x = _LEFT + slot * index + slot * 0.15
        width = slot * 0.7
        centre = x + width / 2
        count = published.counts[group]
        share = published.score(group)
        if count is None:
            ET.SubElement(
                svg,
                "rect",
                {
                    "x": f"{x:g}",
                    "y": str(_TOP),
                    "width": f"{width:g}",
                    "height": str(_PLOT_H),
                    "fill": "none",
                    "stroke": "#999999",
                    "stroke-dasharray": "4 3",
                },
            )
            _text(
                svg, centre, _TOP + _PLOT_H / 2, "suppressed", **{"text-anchor": "middle", "fill": "#777777"}
            )
        else:
            height = _PLOT_H * (share or 0.0)
            ET.SubElement(
                svg,
                "rect",
                {
                    "x": f"{x:g}",
                    "y": f"{_TOP + _PLOT_H - height:g}",
                    "width": f"{width:g}",
                    "height": f"{height:g}",
                    "fill": _COLOURS[group],
                },
            )
            value = f"{count}" if share is None else f"{count} ({share:.0%})"
            _text(svg, centre, _TOP + _PLOT_H - height - 6, value, **{"text-anchor": "middle"})
        _text(svg, centre, _TOP + _PLOT_H + 20, label, **{"text-anchor": "middle", "font-size": "11"})
    rule = (
        f"Counts from 1 to {published.min_cell - 1} (and counts that would reveal them) are suppressed."
        if published.min_cell > 1
        else "No count is suppressed (MHR_FIGURES_MIN_CELL=1)."
    )
    note = f"{rule} Generated {(generated or date.today()).isoformat()} by mhr."
    _text(svg, _LEFT, _HEIGHT - 30, note, **{"font-size": "11", "fill": "#555555"})
    written: bytes = ET.tostring(svg, encoding="utf-8", xml_declaration=True)
    return written


def _median_label(published: PublishedFigures) -> str:
    if published.median_days is not None:
        return f"{published.median_days:g}"
    return "suppressed" if published.median_suppressed else "none evaluated"

"""``mhr figures report``: an organization's completion figures, as a MeasureReport and a chart.

For operators and programme managers without an API client: the same report the endpoints
serve (service.figures.service), from the database the settings name.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from service.core.settings import Settings
from service.figures.chart import render_chart
from service.figures.measure_report import measure_report
from service.figures.period import PeriodError, parse_period
from service.figures.service import NoFigures, Report, build_report
from service.store.database import Database


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    figures = subparsers.add_parser(
        "figures", help="completion figures of the follow-up loop"
    ).add_subparsers(dest="action", required=True)
    report = figures.add_parser(
        "report",
        help="an authority's or clinic organization's figures: MeasureReport JSON (stdout) and SVG chart",
    )
    report.add_argument("--org", required=True, help="the organization, by id or name")
    report.add_argument(
        "--start", required=True, help="first day of the period (YYYY, YYYY-MM or YYYY-MM-DD)"
    )
    report.add_argument(
        "--end", required=True, help="last day of the period, included (a partial date: its end)"
    )
    report.add_argument("--out", type=Path, help="write the chart here (SVG)")
    report.add_argument("--report", type=Path, help="write the MeasureReport here instead of to stdout")
    report.set_defaults(handler=cmd_figures)


def _fail(message: str) -> int:
    print(f"mhr: {message}", file=sys.stderr)
    return 2


def cmd_figures(args: argparse.Namespace, settings: Settings) -> int:
    try:
        period = parse_period(args.start, args.end)
    except PeriodError as exc:
        return _fail(str(exc).replace("periodStart", "--start").replace("periodEnd", "--end"))

    async def run() -> Report:
        database = Database(settings.database_url)
        try:
            async with database.sessions() as session:
                return await build_report(session, args.org, period, min_cell=settings.figures_min_cell)
        finally:
            await database.dispose()

    try:
        report = asyncio.run(run())
    except NoFigures as exc:
        return _fail(f"{exc}: give an authority or a clinic organization (`mhr orgs list`)")
    now = datetime.now(UTC)
    document = measure_report(
        report.figures, report.period, report.organization_id, report.organization_name, now=now
    )
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    if args.report:
        args.report.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    if args.out:
        args.out.write_bytes(
            render_chart(report.figures, report.period, report.organization_name, generated=now.date())
        )
    return 0

"""``Measure/followup-completion/$evaluate-measure`` and ``$chart``: the caller's own figures.

HTTP only: the parameters are read here, the report is built by ``service.figures.service``.
An authority gets the figures of the tasks it owns, a clinic organization those of the tasks it
requested; no parameter can name another organization's figures (``reporter``, R5's name for the
organization reported on, is accepted only when it names the caller's own).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from service.api.auditing import audit_read, rest_record
from service.api.authorization import MeasureChart, MeasureEvaluate, forbidden
from service.api.deps import Principal, ReadSessionDep, RuntimeDep
from service.api.responses import FhirResponse
from service.audit.events import Action, AuditEntity
from service.figures.chart import render_chart
from service.figures.counts import MEASURE_ID
from service.figures.measure_report import measure_report
from service.figures.period import Period, PeriodError, parse_period
from service.figures.service import NoFigures, Report, build_report
from service.http.errors import FhirError, not_found
from service.runtime.providers import Runtime

router = APIRouter(tags=["figures"])
_PARAMETERS = {"periodStart", "periodEnd", "reportType", "reporter", "_format", "_pretty"}
SVG = "image/svg+xml"


def _period(request: Request, principal: Principal) -> Period:
    params = request.query_params
    unknown = set(params) - _PARAMETERS
    if unknown and "handling=lenient" not in request.headers.get("prefer", ""):
        raise FhirError.single(400, "not-supported", "unknown parameter", expression=sorted(unknown)[0])
    for name in ("periodStart", "periodEnd", "reportType", "reporter"):
        if len(params.getlist(name)) > 1:
            raise FhirError.single(400, "invalid", f"{name} may be given once", expression=name)
    report_type = params.get("reportType")
    if report_type not in (None, "population"):
        raise FhirError.single(
            400,
            "not-supported",
            "only reportType=population (a summary) is reported",
            expression="reportType",
        )
    reporter = params.get("reporter")
    own = principal.organization_id
    if reporter is not None and reporter not in (own, f"Organization/{own}"):
        raise forbidden("completion figures are reported for the caller's own organization only")
    try:
        return parse_period(params.get("periodStart"), params.get("periodEnd"))
    except PeriodError as exc:
        raise FhirError.single(400, "value", str(exc), expression=exc.parameter) from None


async def _parameters(
    period_start: Annotated[
        str | None, Query(alias="periodStart", description="first day (FHIR date)")
    ] = None,
    period_end: Annotated[
        str | None, Query(alias="periodEnd", description="last day, included (FHIR date)")
    ] = None,
    report_type: Annotated[str | None, Query(alias="reportType", description="population only")] = None,
    reporter: Annotated[str | None, Query(description="the caller's own Organization only")] = None,
) -> None:
    """The operation's parameters, declared for the API docs; ``_period`` reads and checks them."""


async def _report(
    measure_id: str, request: Request, principal: Principal, session: ReadSessionDep, runtime: Runtime
) -> Report:
    if measure_id != MEASURE_ID:
        raise not_found("Measure")
    period = _period(request, principal)
    try:
        report = await build_report(
            session, principal.organization_id, period, min_cell=runtime.settings.figures_min_cell
        )
    except NoFigures:
        raise not_found("Measure") from None
    return report


async def _audit(runtime: Runtime, principal: Principal, operation: str, period: Period) -> None:
    # Aggregates about the caller's own organization: audited as an operation, with no patient.
    record = rest_record(
        principal,
        f"Measure.{operation}",
        Action.execute,
        entities=(AuditEntity("Measure", MEASURE_ID),),
        query=f"periodStart={period.start.isoformat()}&periodEnd={period.last_day.isoformat()}",
    )
    await audit_read(runtime, [record])


@router.get(
    "/fhir/Measure/{measure_id}/$evaluate-measure",
    response_class=FhirResponse,
    summary="completion figures of the follow-up loop (MeasureReport)",
    dependencies=[Depends(_parameters)],
)
async def evaluate_measure(
    measure_id: str,
    request: Request,
    principal: MeasureEvaluate,
    session: ReadSessionDep,
    runtime: RuntimeDep,
) -> FhirResponse:
    """The caller's own completion figures over the period as a summary MeasureReport."""
    report = await _report(measure_id, request, principal, session, runtime)
    await _audit(runtime, principal, "evaluate-measure", report.period)
    return FhirResponse(
        measure_report(report.figures, report.period, report.organization_id, report.organization_name)
    )


@router.get(
    "/fhir/Measure/{measure_id}/$chart",
    response_class=Response,
    summary="completion figures of the follow-up loop (SVG chart)",
    responses={200: {"content": {SVG: {}}}},
    dependencies=[Depends(_parameters)],
)
async def chart(
    measure_id: str, request: Request, principal: MeasureChart, session: ReadSessionDep, runtime: RuntimeDep
) -> Response:
    """The same figures as an SVG bar chart (image/svg+xml) to open in a browser."""
    if not _accepts_svg(request.headers.get("accept", "")):
        raise FhirError.single(406, "not-supported", f"this operation answers {SVG}")
    report = await _report(measure_id, request, principal, session, runtime)
    await _audit(runtime, principal, "chart", report.period)
    body = render_chart(
        report.figures, report.period, report.organization_name, generated=datetime.now(UTC).date()
    )
    return Response(body, media_type=SVG)


def _accepts_svg(accept: str) -> bool:
    media = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    return not accept.strip() or bool(media & {SVG, "image/*", "*/*"})

"""One report: whose figures, counted, suppressed; the one path the endpoint and the CLI share."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from service.figures.counts import Perspective
from service.figures.period import Period
from service.figures.repository import completion_figures
from service.figures.suppression import PublishedFigures, suppress
from service.identity.repository import IdentityRepository

# The organization kinds that have completion figures, and whose they are.
PERSPECTIVES = {"authority": Perspective.authority, "clinic": Perspective.clinic}


class NoFigures(LookupError):
    """The organization does not exist, or is of a kind that has no completion figures."""


@dataclass(frozen=True)
class Report:
    organization_id: str
    organization_name: str
    perspective: Perspective
    period: Period
    figures: PublishedFigures


async def build_report(session: AsyncSession, organization: str, period: Period, *, min_cell: int) -> Report:
    """The published figures of ``organization`` (an id or a name) over ``period``."""
    found = await IdentityRepository(session).organization_by_id_or_name(organization)
    if found is None:
        raise NoFigures("no such organization")
    perspective = PERSPECTIVES.get(found.kind)
    if perspective is None:
        raise NoFigures(f"an organization of kind {found.kind} has no completion figures")
    counted = await completion_figures(session, found.id, perspective, period)
    return Report(found.id, found.name, perspective, period, suppress(counted, min_cell))

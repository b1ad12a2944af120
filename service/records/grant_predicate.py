"""The one visibility predicate, as SQL: may this audience see this stored version, and why?

Every statement that hands a stored version to a reader (read, vread, history,
search, ``$everything``, the reference check on the way out, and any later job
that asks "may organization X see version V now?") filters with
:func:`visible` and takes the permit from :func:`permit_id`. Both decide on
the columns of the ``resource_versions`` row being served (its subject, type
and label set), never on the current pointer, so that an older version is
judged by what it contains.

- A clinic (tenancy): exactly the versions its own organization wrote, of migrants not
  erased (the submitting clinic is then told 410 Gone by the read paths, not served).
- An authority: a disclosure grant (materialised from the migrant's Consents
  by ``security.consent_grants``) for this organization and purpose, in force
  now, for the version's resource type and *exact* label set. A version
  without a label token matches nothing (fails closed). An erased migrant has no grants.
- Anyone else: nothing.

The parameters of a grant are bound by name (``grant_org``, ``grant_purpose``,
``grant_at``), so that statements built once keep their compiled form; pass
:meth:`Audience.params` when executing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import (
    ColumnElement,
    FromClause,
    ScalarSelect,
    Table,
    and_,
    bindparam,
    exists,
    false,
    or_,
    select,
)

from service.store.tables import DisclosureGrant, Subject, UtcDateTime

GRANTS = cast(Table, DisclosureGrant.__table__)
SUBJECTS = cast(Table, Subject.__table__)


@dataclass(frozen=True)
class GrantFilter:
    """Only what a disclosure grant lets this organization receive, for this purpose, now."""

    organization_id: str
    purpose: str
    at: datetime


@dataclass(frozen=True)
class Audience:
    """Whose eyes a statement filters for: a clinic's tenancy, an authority's grants, or nobody."""

    organization_id: str | None = None  # tenancy
    grant: GrantFilter | None = None

    def params(self) -> dict[str, object]:
        if self.grant is not None:
            g = self.grant
            return {"grant_org": g.organization_id, "grant_purpose": g.purpose, "grant_at": g.at}
        if self.organization_id is not None:
            return {"tenant_org": self.organization_id}
        return {}


NOBODY = Audience()


def admits(g: FromClause, version: FromClause, at: ColumnElement[datetime]) -> ColumnElement[bool]:
    """Grant row ``g`` admits this ``resource_versions`` row at ``at``, to ``g``'s organization
    and purpose. The rule of :func:`visible`, for a statement that asks *which* audiences
    may see a version (who to notify) rather than whether one may."""
    return and_(
        g.c.subject_id == version.c.subject_id,
        g.c.resource_type == version.c.resource_type,
        g.c.labels_token == version.c.labels_token,
        or_(g.c.valid_from.is_(None), g.c.valid_from <= at),
        or_(g.c.valid_to.is_(None), g.c.valid_to > at),
    )


def _grant_conditions(g: FromClause, version: FromClause) -> ColumnElement[bool]:
    at = bindparam("grant_at", type_=UtcDateTime())
    return and_(
        g.c.organization_id == bindparam("grant_org"),
        g.c.purpose == bindparam("grant_purpose"),
        admits(g, version, at),
    )


def visible(version: FromClause, audience: Audience) -> ColumnElement[bool]:
    """May ``audience`` see this ``resource_versions`` row? (A WHERE clause, before paging.)"""
    if audience.grant is not None:
        return exists().where(_grant_conditions(GRANTS.alias("grant_match"), version))
    if audience.organization_id is not None:
        erased = SUBJECTS.alias("erased_subject")
        return and_(
            version.c.organization_id == bindparam("tenant_org"),
            ~exists().where(erased.c.id == version.c.subject_id, erased.c.erased_at.is_not(None)),
        )
    return false()


def permit_id(version: FromClause) -> ScalarSelect[int]:
    """The id of the grant that admits this row to an authority (NULL: none).

    Where two grants overlap (two Consents permit the same), the first by consent id and
    version decides, in every statement alike; its rule and consent version go into the
    disclosure's audit entry.
    """
    g = GRANTS.alias("grant_permit")
    return (
        select(g.c.id)
        .where(_grant_conditions(g, version))
        .order_by(g.c.consent_id, g.c.consent_version, g.c.id)
        .limit(1)
        .scalar_subquery()
    )

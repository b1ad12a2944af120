"""Which stored resources an actor may see: a row check for reads, a filter for searches.

- Clinics: exactly what their own organization submitted (tenancy).
- Authorities: what a disclosure grant permits: grants are materialised from
  the migrant's Consents by ``security.consent.decide`` (see
  ``service.records.consents``), matched on organization, purpose of use,
  resource type, sensitivity-label set and time, in SQL before paging.
- Everyone else, and an authority token without a purpose of use: nothing.
Whatever may not be seen is treated as absent (404, not 403).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from service.records.context import Actor
from service.records.repository import CurrentRead, GrantFilter, SearchFilter


@dataclass(frozen=True)
class Permit:
    rule: str
    consent_id: str | None = None
    consent_version: int | None = None


TENANCY = Permit("permit.tenancy")


@dataclass(frozen=True)
class Visibility:
    actor: Actor
    at: datetime

    @property
    def grant(self) -> GrantFilter | None:
        if self.actor.role != "authority" or not self.actor.purpose:
            return None
        return GrantFilter(self.actor.organization_id, self.actor.purpose, self.at)

    def permits(self, found: CurrentRead) -> Permit | None:
        """May this actor see a resource fetched with ``self.grant`` (its matching grant joined)?"""
        if self.actor.role == "clinic":
            return TENANCY if found.organization_id == self.actor.organization_id else None
        if self.grant is None or found.grant is None:
            return None
        return Permit(found.grant.rule, found.grant.consent_id, found.grant.consent_version)

    def restrict(self, flt: SearchFilter) -> SearchFilter:
        if self.actor.role == "clinic":
            flt.organization_id = self.actor.organization_id
        elif (grant := self.grant) is not None:
            flt.grant = grant
        else:
            flt.match_nothing = True
        return flt

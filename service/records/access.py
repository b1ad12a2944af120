"""Which stored resources an actor may see: a row check for reads, a filter for searches.

- Clinics: exactly what their own organization submitted (tenancy).
- Authorities: what a disclosure grant permits: grants are materialised from
  the migrant's Consents by ``security.consent.decide`` (see
  ``service.records.consents``), matched on organization, purpose of use,
  and the served version's resource type, subject and sensitivity-label set,
  and time, in SQL before paging (``service.records.grant_predicate``).
- Everyone else, and an authority token without a purpose of use: nothing.
Whatever may not be seen is treated as absent (404, not 403).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from security.roles import Role
from service.records.context import Actor
from service.records.grant_predicate import NOBODY, Audience, GrantFilter
from service.records.repository import SearchFilter, VersionRow


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
        if self.actor.role != Role.authority or not self.actor.purpose:
            return None
        return GrantFilter(self.actor.organization_id, self.actor.purpose, self.at)

    @property
    def audience(self) -> Audience:
        """Whose eyes the store's one visibility predicate filters for (see ``grant_predicate``)."""
        if self.actor.role == Role.clinic:
            return Audience(organization_id=self.actor.organization_id)
        if (grant := self.grant) is not None:
            return Audience(grant=grant)
        return NOBODY

    @staticmethod
    def permit_of(row: VersionRow) -> Permit:
        """What admitted a row the store returned: its grant (authorities), or tenancy (clinics)."""
        if row.grant is None:
            return TENANCY
        return Permit(row.grant.rule, row.grant.consent_id, row.grant.consent_version)

    def restrict(self, flt: SearchFilter) -> SearchFilter:
        if self.actor.role == Role.clinic:
            flt.organization_id = self.actor.organization_id
        elif (grant := self.grant) is not None:
            flt.grant = grant
        else:
            flt.match_nothing = True
        return flt

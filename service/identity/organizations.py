"""Organizations as FHIR ``Organization`` resources (not PHI: who the parties are)."""

from __future__ import annotations

from typing import Any

from security.roles import Role
from service.store.tables import Organization

ORG_IDENTIFIER_SYSTEM = "https://mhr.example.org/fhir/sid/organization"
ORG_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/organization-type"
MHR_ORG_ROLE_SYSTEM = "https://mhr.example.org/fhir/CodeSystem/organization-role"
_ORG_TYPE = {Role.clinic: "prov", Role.authority: "govt", Role.auditor: "other", Role.admin: "other"}


def organization_resource(org: Organization) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Organization",
        "id": org.id,
        "meta": {"lastUpdated": org.created_at.isoformat()},
        "identifier": [{"system": ORG_IDENTIFIER_SYSTEM, "value": org.id}],
        "active": org.active,
        "type": [
            {
                "coding": [
                    {"system": ORG_TYPE_SYSTEM, "code": _ORG_TYPE[Role(org.kind)]},
                    {"system": MHR_ORG_ROLE_SYSTEM, "code": org.kind},
                ]
            }
        ],
        "name": org.name,
    }
    if org.jurisdiction:
        country, _, region = org.jurisdiction.partition("-")
        address: dict[str, str] = {"country": country}
        if region:
            address["state"] = region
        resource["address"] = [address]
    return resource

"""Registering organizations and clients: the rules an operator's input must meet."""

from __future__ import annotations

import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlparse

from security.client_assertion import validate_public_jwks
from security.roles import Role
from security.scopes import ScopeError, format_scopes, intersect, parse_scopes, role_ceiling
from service.identity.repository import IdentityRepository
from service.store.tables import Client, Organization

ORG_KINDS = tuple(Role)
# v3-ActReason purposes of use a client may register for.
KNOWN_PURPOSES = frozenset({"PUBHLTH", "TREAT", "COC", "HPAYMT", "HOPERAT", "HRESCH", "PATRQT", "HTEST"})
_JURISDICTION = re.compile(r"^[A-Z]{2,3}(-[A-Z0-9]{1,8})?$")


class RegistrationError(ValueError):
    """Operator input that cannot be registered; the message says what to fix."""


@dataclass(frozen=True)
class ClientRegistration:
    organization: str
    role: Role
    jwks: dict[str, Any] | None = None
    jwks_url: str | None = None
    scopes: str | None = None
    purposes: tuple[str, ...] = ()
    description: str | None = None
    # The purpose a token carries when the client asks for none; registered with ``purposes``.
    default_purpose: str | None = None


_ORG_ID = re.compile(r"^[a-z0-9][a-z0-9-]{1,63}$")


async def add_organization(
    repo: IdentityRepository,
    *,
    name: str,
    kind: str,
    jurisdiction: str | None = None,
    org_id: str | None = None,
) -> Organization:
    """``org_id`` lets an operator choose a stable id (it is the Organization's identifier,
    which consents name); by default a random UUID."""
    name = name.strip()
    if not 1 <= len(name) <= 200:
        raise RegistrationError("organization name must be 1-200 characters")
    if kind not in ORG_KINDS:
        raise RegistrationError(f"kind must be one of {', '.join(ORG_KINDS)}")
    if jurisdiction is not None and not _JURISDICTION.match(jurisdiction):
        raise RegistrationError("jurisdiction must be an ISO 3166 code such as CA or US-NY")
    if org_id is not None and not _ORG_ID.match(org_id):
        raise RegistrationError("an organization id is 2-64 lowercase letters, digits and hyphens")
    if await repo.organization_by_id_or_name(name) is not None or (
        org_id is not None and await repo.organization(org_id) is not None
    ):
        raise RegistrationError("an organization with that name or id exists")
    org = Organization(
        id=org_id or str(uuid.uuid4()),
        name=name,
        kind=kind,
        jurisdiction=jurisdiction,
        active=True,
        created_at=datetime.now(UTC),
    )
    await repo.add_organization(org)
    return org


async def add_client(repo: IdentityRepository, registration: ClientRegistration) -> Client:
    org = await repo.organization_by_id_or_name(registration.organization)
    if org is None:
        raise RegistrationError("no such organization")
    if registration.role != org.kind:
        # One role per organization kind keeps "who may see what" legible.
        raise RegistrationError(f"a {org.kind} organization's clients have role {org.kind}")
    if (registration.jwks is None) == (registration.jwks_url is None):
        raise RegistrationError("give exactly one of a JWKS or a JWKS URL")
    jwks = None
    if registration.jwks is not None:
        try:
            jwks = {"keys": validate_public_jwks(registration.jwks)}
        except ValueError as exc:
            raise RegistrationError(str(exc)) from exc
    if registration.jwks_url is not None:
        parsed = urlparse(registration.jwks_url)
        if parsed.scheme != "https" and parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise RegistrationError("a JWKS URL must be https")
    ceiling = role_ceiling(registration.role)
    try:
        requested = parse_scopes(registration.scopes) if registration.scopes else ceiling
    except ScopeError as exc:
        raise RegistrationError(f"scopes: {exc}") from exc
    if any(intersect([scope], ceiling) != [scope] for scope in requested):
        raise RegistrationError(f"scopes exceed what role {registration.role} may hold")
    granted = intersect(requested, requested)
    unknown = set(registration.purposes) - KNOWN_PURPOSES
    if unknown:
        raise RegistrationError(f"unknown purpose of use; known: {', '.join(sorted(KNOWN_PURPOSES))}")
    purposes = set(registration.purposes)
    if registration.default_purpose is not None:
        if registration.default_purpose not in KNOWN_PURPOSES:
            raise RegistrationError(
                f"unknown default purpose of use; known: {', '.join(sorted(KNOWN_PURPOSES))}"
            )
        purposes.add(registration.default_purpose)  # a default is a registered purpose
    client = Client(
        id=f"{registration.role}-{secrets.token_hex(8)}",
        organization_id=org.id,
        role=registration.role,
        description=registration.description,
        jwks=jwks,
        jwks_url=registration.jwks_url,
        scopes=format_scopes(granted),
        purposes=" ".join(sorted(purposes)),
        default_purpose=registration.default_purpose,
        active=True,
        created_at=datetime.now(UTC),
    )
    await repo.add_client(client)
    return client

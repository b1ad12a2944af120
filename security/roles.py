"""The roles a client is registered under: one per organization kind.

A role decides which interactions a client may ever use (``service.api.authorization``)
and the most it may be granted as scopes (``security.scopes.ROLE_CEILING``). It travels
in the access token and on every audit entry a client causes.
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    clinic = "clinic"  # examines migrants and writes their records
    authority = "authority"  # a receiving health authority: reads what consent permits
    auditor = "auditor"  # reads the audit log, never clinical data
    admin = "admin"  # operates the service: organizations, clients, keys


ALL_ROLES: frozenset[Role] = frozenset(Role)

"""SMART App Launch v2 system scopes: ``system/<Type|*>.<cruds>`` (v1 ``.read``/``.write``/``.*`` accepted).

Granting is an intersection: what a client asks for, cut down to what it is
registered for, cut down to what its role may ever hold. A client never gets
more than it asked for, and asking for more than allowed is not an error as
long as something remains (SMART: the server may grant fewer scopes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from security.roles import Role

PERMISSION_ORDER = "cruds"
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}
_SCOPE = re.compile(r"^system/(?P<type>\*|[A-Z][A-Za-z]{1,63})\.(?P<perm>[cruds]{1,5}|read|write|\*)$")

# What each role may ever be granted, whatever its registration says.
ROLE_CEILING: dict[Role, tuple[str, ...]] = {
    Role.clinic: ("system/*.cruds",),
    # Reads what consent permits; manages its own Subscriptions (service.subscriptions).
    Role.authority: ("system/*.rs", "system/Subscription.cruds"),
    Role.auditor: ("system/AuditEvent.rs", "system/Organization.rs"),
    Role.admin: ("system/Organization.rs",),
}


class ScopeError(ValueError):
    """A scope string that is not a SMART system scope."""


@dataclass(frozen=True, order=True)
class Scope:
    resource_type: str  # "*" for all types
    permissions: str  # a subset of "cruds", in that order

    @classmethod
    def parse(cls, text: str) -> Scope:
        match = _SCOPE.match(text)
        if not match:
            raise ScopeError("not a SMART system scope")
        perm = match["perm"]
        perm = _V1.get(perm, perm)
        if len(set(perm)) != len(perm) or perm != "".join(c for c in PERMISSION_ORDER if c in perm):
            raise ScopeError("permissions must be a subset of 'cruds' in that order")
        return cls(match["type"], perm)

    def __str__(self) -> str:
        return f"system/{self.resource_type}.{self.permissions}"

    def intersect(self, other: Scope) -> Scope | None:
        if self.resource_type == "*":
            rtype = other.resource_type
        elif other.resource_type in ("*", self.resource_type):
            rtype = self.resource_type
        else:
            return None
        perms = "".join(c for c in PERMISSION_ORDER if c in self.permissions and c in other.permissions)
        return Scope(rtype, perms) if perms else None

    def allows(self, resource_type: str, permission: str) -> bool:
        return self.resource_type in ("*", resource_type) and permission in self.permissions


def parse_scopes(text: str) -> list[Scope]:
    """Parse a space-separated scope list; raises ScopeError on any malformed scope."""
    return [Scope.parse(part) for part in text.split()]


def grantable_scopes(text: str) -> list[Scope]:
    """The system scopes of a token request; anything else is dropped, not refused.

    OAuth lets a server grant fewer scopes than asked (RFC 6749 3.3, reported in the token
    response's ``scope``). Stock clients ask for more than a backend service can hold: the
    SMART client ``fhirclient`` always adds ``launch/patient``, others ``openid`` or
    ``offline_access``; refusing the request for them would lock those clients out.
    """
    scopes = []
    for part in text.split():
        try:
            scopes.append(Scope.parse(part))
        except ScopeError:
            continue
    return scopes


def intersect(requested: list[Scope], allowed: list[Scope]) -> list[Scope]:
    granted = {s for r in requested for a in allowed if (s := r.intersect(a)) is not None}
    # Drop scopes wholly covered by another granted one, so the token stays short.
    minimal = [
        s
        for s in granted
        if not any(
            o != s and o.resource_type in ("*", s.resource_type) and set(s.permissions) <= set(o.permissions)
            for o in granted
        )
    ]
    return sorted(minimal)


def role_ceiling(role: Role) -> list[Scope]:
    return [Scope.parse(s) for s in ROLE_CEILING.get(role, ())]


def format_scopes(scopes: list[Scope]) -> str:
    return " ".join(str(s) for s in scopes)


def scopes_allow(scopes: list[Scope], resource_type: str, permission: str) -> bool:
    return any(s.allows(resource_type, permission) for s in scopes)

"""The one authorization chokepoint: every route declares it, and every refusal looks the same.

Walks the app's routes, so that a route added later cannot forget to say who may use it,
and asks each one as a caller it refuses: the 403 must be the one shape (OperationOutcome
``forbidden``, the RFC 6750 ``insufficient_scope`` challenge) with one audit entry of the one
vocabulary (``<type>.<interaction>``, ``403: <diagnostics>``).
"""

from __future__ import annotations

import json
import re
from typing import Any

import sqlalchemy as sa
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts
from mhr_testkit import FHIR_HEADERS, Party, Service, sync_url

from security.roles import ALL_ROLES, Role
from service.api.authorization import (
    ROLE_ONLY,
    ROLE_REFUSED,
    Authorization,
    Interaction,
    Rule,
    declared_authorization,
    scope_refused,
)

# Routes that serve anyone, by design: probes, the capability and SMART discovery documents,
# the token endpoint (it authenticates the client assertion itself) and the API docs.
PUBLIC = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/fhir/metadata"),
    ("GET", "/fhir/.well-known/smart-configuration"),
    ("POST", "/auth/token"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
}
# Any authenticated caller, the route refusing every one of them itself (405).
AUTHENTICATED_ONLY = {
    ("DELETE", "/fhir/{resource_type}/{resource_id}"),
    ("GET", "/fhir/Patient/{patient_id}/$erasure-receipt"),  # 404 to all but the submitting clinic
}
PATH_VALUES = {
    "resource_type": "Observation",
    "resource_id": "x1",
    "patient_id": "p1",
    "version_id": "1",
    "entry_id": "1",
    "org_id": "o1",
    "request_id": "r1",
    "hold_id": "1",
    "group_id": "g1",
    "export_id": "e" * 32,
    "file_name": "Patient.ndjson",
}


def _authorizations(dependant: Dependant) -> list[Authorization]:
    found = []
    for dependency in dependant.dependencies:
        declared = declared_authorization(dependency.call)
        if declared is not None:
            found.append(declared)
        found.extend(_authorizations(dependency))
    return found


def _api_routes(service: Service) -> list[tuple[str, set[str], Dependant]]:
    """Every API route of the app as served (path, methods, dependencies), included routers too."""
    app = service.fastapi  # type: ignore[attr-defined]
    found = []
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        if isinstance(route, APIRoute):
            found.append((str(context.path), set(context.methods or route.methods), route.dependant))
    return found


def _routes(service: Service) -> list[tuple[str, str, Authorization | None]]:
    routes = []
    for path, methods, dependant in _api_routes(service):
        declared = _authorizations(dependant)
        assert len(declared) <= 1, f"{path} declares its authorization twice"
        for method in sorted(methods - {"HEAD"}):
            routes.append((method, path, declared[0] if declared else None))
    assert len(routes) > 20  # the walk sees the included routers
    return routes


def test_every_route_declares_its_authorization_through_the_one_dependency(service: Service) -> None:
    routes = _routes(service)
    undeclared = {(m, p) for m, p, declared in routes if declared is None}
    assert undeclared <= PUBLIC, f"routes without an authorization: {sorted(undeclared - PUBLIC)}"
    no_rules = {(m, p) for m, p, declared in routes if declared is not None and not declared.rules}
    assert no_rules == AUTHENTICATED_ONLY
    # Every rule names at least one role, and only roles there are.
    for _, path, declared in routes:
        for rule in declared.rules if declared else ():
            assert rule.roles and rule.roles <= ALL_ROLES, path


def test_a_public_route_takes_no_principal(service: Service) -> None:
    """Public means public: a route on the list does not authenticate behind the test's back."""
    for path, methods, dependant in _api_routes(service):
        if any((m, path) in PUBLIC for m in methods):
            names = {getattr(d.call, "__name__", "") for d in _flat(dependant)}
            assert "authenticate" not in names, path


def _flat(dependant: Dependant) -> list[Dependant]:
    return [d for dep in dependant.dependencies for d in (dep, *_flat(dep))]


def _url(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: PATH_VALUES[m.group(1)], path)


def _refusals(database_url: str) -> list[dict[str, Any]]:
    engine = sa.create_engine(sync_url(database_url))
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT content FROM audit_entries WHERE outcome = '4' ORDER BY id"))
        contents = [json.loads(bytes(c)) for c in rows.scalars()]
    engine.dispose()
    return contents


def _assert_the_one_403(response: Any, diagnostics: str) -> None:
    assert response.status_code == 403, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert [(i["severity"], i["code"], i["diagnostics"]) for i in body["issue"]] == [
        ("error", "forbidden", diagnostics)
    ]
    assert response.headers["www-authenticate"] == (
        f'Bearer realm="mhr", error="insufficient_scope", error_description="{diagnostics}"'
    )


def _ask(service: Service, method: str, path: str, headers: dict[str, str]) -> Any:
    body = b"{}" if method in ("POST", "PUT") else None
    return service.client.request(method, _url(path), content=body, headers={**headers, **FHIR_HEADERS})


def _check(
    service: Service, database_url: str, method: str, path: str, cases: list[tuple[dict[str, str], str, str]]
) -> None:
    for headers, diagnostics, subtype in cases:
        before = len(_refusals(database_url))
        response = _ask(service, method, path, headers)
        _assert_the_one_403(response, diagnostics)
        entries = _refusals(database_url)[before:]
        assert [(e["subtype"], e["detail"], e["route"]) for e in entries] == [
            (subtype, f"403: {diagnostics}", path)
        ], f"{method} {path}"


def _type_of(rule: Rule) -> str:
    return rule.resource_type or PATH_VALUES["resource_type"]


def test_every_refusal_is_the_one_403_audited_once_in_the_one_vocabulary(
    service: Service, database_url: str
) -> None:
    parties: dict[Role, Party] = {
        Role.clinic: service.register("clinic", Role.clinic),
        Role.authority: service.register("authority", Role.authority, purposes=("PUBHLTH",)),
        Role.auditor: service.register("auditor", Role.auditor),
        Role.admin: service.register("admin", Role.admin),
    }
    full = {role: service.headers(party) for role, party in parties.items()}
    checked = 0
    for method, path, declared in _routes(service):
        if declared is None or not declared.rules:
            continue
        main = declared.rules[0]
        admitted = frozenset().union(*(r.roles for r in declared.rules))
        cases: list[tuple[dict[str, str], str, str]] = []
        # A role no rule names: refused as a role, named by the route's main rule.
        for role in sorted(ALL_ROLES - admitted):
            cases.append((full[role], ROLE_REFUSED, f"{_type_of(main)}.{main.interaction}"))
        if main.interaction in ROLE_ONLY:  # no scope names it: the role alone decides
            _check(service, database_url, method, path, cases)
            checked += len(cases)
            continue
        # An admitted role whose token lacks the scope.
        rule = main
        role = sorted(rule.roles)[0]
        narrow = "system/AuditEvent.rs" if _type_of(rule) == "Organization" else "system/Organization.rs"
        if _type_of(rule) == "Organization":
            role = Role.auditor
        cases.append(
            (
                service.headers(parties[role], narrow),
                scope_refused(_type_of(rule), rule.interaction),
                f"{_type_of(rule)}.{rule.interaction}",
            )
        )
        _check(service, database_url, method, path, cases)
        checked += len(cases)
    assert checked >= 30  # the walk reached the routes (about 20 routes, two or more cases each)


def test_a_transaction_entry_the_role_may_not_write_is_the_same_403(
    service: Service, database_url: str
) -> None:
    """The entries of a transaction are checked by the same rule as a create or update alone."""
    clinic = service.register("clinic", Role.clinic)
    narrow = service.headers(clinic, "system/Bundle.c system/Patient.c")
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": {"resourceType": "Observation"}, "request": {"method": "POST", "url": "Observation"}}
        ],
    }
    before = len(_refusals(database_url))
    response = service.client.post("/fhir", content=json.dumps(bundle), headers={**narrow, **FHIR_HEADERS})
    diagnostics = scope_refused("Observation", Interaction.create)
    _assert_the_one_403(response, diagnostics)
    entries = _refusals(database_url)[before:]
    assert [(e["subtype"], e["detail"], e["route"]) for e in entries] == [
        ("Observation.create", f"403: {diagnostics}", "/fhir")
    ]

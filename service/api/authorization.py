"""The one authorization chokepoint: who may use which interaction, stated at the route.

Every route that serves an authenticated caller takes its ``Principal`` through one of the
``Annotated`` aliases at the end of this module (``RecordRead``, ``ClinicCreate``,
``AuditSearch`` ...), so that a route's signature reads as its access contract and the whole
policy reads here as one table. ``tests/api/test_authorization.py`` walks the app's routes
and fails for a route that serves a caller without one of them.

An interaction is allowed when the caller's role is one the rule names and the token holds
a scope for the interaction on the resource type. A refusal is the one 403 of this service
(OperationOutcome ``forbidden``, ``WWW-Authenticate: Bearer error="insufficient_scope"``,
RFC 6750 3.1, so that a client knows to ask for another token) and one audit entry, handed
to the refusal chokepoint (``service.api.refusal_audit``), with subtype
``<resource type>.<interaction>`` and detail ``403: <diagnostics>`` (fixed texts and
known type names, never request data).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, NoReturn

from fastapi import Depends, Request

from security.roles import ALL_ROLES, Role
from service.api.deps import Principal, PrincipalDep, agent_of_claims
from service.api.resource_path import KnownType
from service.audit import request_audit
from service.audit.events import Action, AuditRecord, EventType, Outcome
from service.http.errors import FhirError


class Interaction(StrEnum):
    """FHIR restful interactions and this service's operations, as they name audit subtypes."""

    read = "read"
    vread = "vread"
    history = "history-instance"
    search = "search-type"
    create = "create"
    update = "update"
    delete = "delete"
    transaction = "transaction"
    validate = "validate"  # $validate: a create's checks, nothing stored
    everything = "everything"  # Patient/$everything
    export = "export"  # Bulk Data $export: kick-off, status, files
    # Erasure (admins, under a two-person rule): operations on no resource type a scope names.
    erasure_request = "erasure-request"
    erasure_approve = "erasure-approve"
    erasure_status = "erasure-status"
    retention_hold = "retention-hold"
    retention_hold_release = "retention-hold-release"
    # Completion figures of the follow-up loop (service.figures): counts, no personal data.
    evaluate_measure = "evaluate-measure"  # Measure/$evaluate-measure
    measure_chart = "chart"  # Measure/$chart
    # Follow-up tasks (service.tasks): the owning authority's own changes, decided by role and owner.
    task_progress = "task-progress"
    task_transfer = "task-transfer"


# The SMART scope permission (``cruds``) each interaction needs.
PERMISSION: dict[Interaction, str] = {
    Interaction.read: "r",
    Interaction.vread: "r",
    Interaction.history: "r",
    Interaction.everything: "r",
    Interaction.export: "r",
    Interaction.search: "s",
    Interaction.create: "c",
    Interaction.transaction: "c",
    Interaction.validate: "c",
    Interaction.update: "u",
    Interaction.delete: "d",
    Interaction.evaluate_measure: "r",
    Interaction.measure_chart: "r",
}
# Decided by the role alone: no SMART scope names them (the admin role's ceiling is
# Organization.rs), so the scope check does not apply.
ROLE_ONLY = frozenset(
    {
        Interaction.erasure_request,
        Interaction.erasure_approve,
        Interaction.erasure_status,
        Interaction.retention_hold,
        Interaction.retention_hold_release,
        Interaction.task_progress,
        Interaction.task_transfer,
    }
)
_ACTION: dict[Interaction, Action] = {
    Interaction.read: Action.read,
    Interaction.vread: Action.read,
    Interaction.history: Action.read,
    Interaction.everything: Action.read,
    Interaction.export: Action.execute,
    Interaction.search: Action.execute,
    Interaction.create: Action.create,
    Interaction.transaction: Action.create,
    Interaction.validate: Action.execute,
    Interaction.update: Action.update,
    Interaction.delete: Action.delete,
    Interaction.erasure_request: Action.create,
    Interaction.erasure_approve: Action.delete,
    Interaction.erasure_status: Action.read,
    Interaction.retention_hold: Action.create,
    Interaction.retention_hold_release: Action.update,
    Interaction.evaluate_measure: Action.execute,
    Interaction.measure_chart: Action.execute,
    Interaction.task_progress: Action.update,
    Interaction.task_transfer: Action.update,
}

ROLE_REFUSED = "this client's role may not use this interaction"


@dataclass(frozen=True)
class Rule:
    """The roles that may use an interaction on a resource type (None: the route's ``{resource_type}``)."""

    interaction: Interaction
    roles: frozenset[Role]
    resource_type: str | None = None


@dataclass(frozen=True)
class Authorization:
    """What a route declares: rules tried in order, the first naming the caller's role applies.

    No rules: any authenticated caller, for a route that refuses every one of them itself
    (DELETE, which this service never supports).
    """

    rules: tuple[Rule, ...]


def forbidden(diagnostics: str) -> FhirError:
    """The one 403: the diagnostics go in the OperationOutcome and the Bearer challenge alike."""
    challenge = f'Bearer realm="mhr", error="insufficient_scope", error_description="{diagnostics}"'
    return FhirError.single(403, "forbidden", diagnostics, headers={"WWW-Authenticate": challenge})


def scope_refused(resource_type: str, interaction: Interaction) -> str:
    return f"the token lacks a scope for {resource_type} ({PERMISSION[interaction]})"


def authorize(principal: Principal, rule: Rule, resource_type: str, request: Request) -> None:
    """Refuse (403, audited once) unless this principal may use the rule's interaction on the type.

    For checks a route makes on what its body names (the entries of a transaction Bundle);
    the route itself declares its rule through ``requires``.
    """
    if principal.role not in rule.roles:
        _refuse(principal, rule.interaction, resource_type, ROLE_REFUSED, request)
    if rule.interaction in ROLE_ONLY:
        return
    if not principal.may(resource_type, PERMISSION[rule.interaction]):
        _refuse(
            principal,
            rule.interaction,
            resource_type,
            scope_refused(resource_type, rule.interaction),
            request,
        )


def _refuse(
    principal: Principal,
    interaction: Interaction,
    resource_type: str,
    diagnostics: str,
    request: Request,
) -> NoReturn:
    error = forbidden(diagnostics)
    route = getattr(request.scope.get("route"), "path", None)
    request_audit.refusal_reason(diagnostics[:120])
    request_audit.hand_over(
        AuditRecord(
            event_type=EventType.rest,
            subtype=f"{resource_type}.{interaction}",
            action=_ACTION[interaction],
            outcome=Outcome.minor_failure,
            agent=agent_of_claims(principal.claims),
            purpose=principal.claims.purpose,
            detail=f"403: {diagnostics}"[:200],
            route=route if isinstance(route, str) else None,
        )
    )
    raise error


def _applicable(principal: Principal, rules: tuple[Rule, ...]) -> Rule:
    # No rule names the role: refused as a role, under the route's first (main) rule.
    return next((r for r in rules if principal.role in r.roles), rules[0])


def requires(*rules: Rule) -> Callable[..., Awaitable[Principal]]:
    """The route's dependency: the authenticated caller, admitted by the first applicable rule."""
    declared = Authorization(rules)
    if any(r.resource_type is None for r in rules):

        async def check_path_type(
            principal: PrincipalDep, resource_type: KnownType, request: Request
        ) -> Principal:
            rule = _applicable(principal, rules)
            authorize(principal, rule, rule.resource_type or resource_type, request)
            return principal

        check_path_type.authorization = declared  # type: ignore[attr-defined]
        return check_path_type

    async def check(principal: PrincipalDep, request: Request) -> Principal:
        if rules:
            rule = _applicable(principal, rules)
            assert rule.resource_type is not None
            authorize(principal, rule, rule.resource_type, request)
        return principal

    check.authorization = declared  # type: ignore[attr-defined]
    return check


def declared_authorization(call: object) -> Authorization | None:
    """The authorization a dependency callable declares (for the route walk in the tests)."""
    found = getattr(call, "authorization", None)
    return found if isinstance(found, Authorization) else None


CLINIC = frozenset({Role.clinic})
AUDITOR = frozenset({Role.auditor})
# Clinics read their own submissions; authorities read what consent permits.
RECORD_READERS = frozenset({Role.clinic, Role.authority})

# --- the policy, one alias per contract ------------------------------------------------------
# Clinical records (the route's {resource_type}, or fixed where the route names it).
ClinicTransaction = Annotated[Principal, Depends(requires(Rule(Interaction.transaction, CLINIC, "Bundle")))]
ClinicCreate = Annotated[Principal, Depends(requires(Rule(Interaction.create, CLINIC)))]
ClinicUpdate = Annotated[Principal, Depends(requires(Rule(Interaction.update, CLINIC)))]
ClinicValidate = Annotated[Principal, Depends(requires(Rule(Interaction.validate, CLINIC)))]
ClinicValidateBundle = Annotated[Principal, Depends(requires(Rule(Interaction.validate, CLINIC, "Bundle")))]
RecordRead = Annotated[Principal, Depends(requires(Rule(Interaction.read, RECORD_READERS)))]
RecordVread = Annotated[Principal, Depends(requires(Rule(Interaction.vread, RECORD_READERS)))]
RecordHistory = Annotated[Principal, Depends(requires(Rule(Interaction.history, RECORD_READERS)))]
RecordSearch = Annotated[Principal, Depends(requires(Rule(Interaction.search, RECORD_READERS)))]
PatientEverything = Annotated[
    Principal, Depends(requires(Rule(Interaction.everything, RECORD_READERS, "Patient")))
]
# The accounting of disclosures: the examining clinic (reads the patient), or an auditor
# (reads the audit log, not the record).
DisclosureAccounting = Annotated[
    Principal,
    Depends(
        requires(
            Rule(Interaction.read, CLINIC, "Patient"),
            Rule(Interaction.search, AUDITOR, "AuditEvent"),
        )
    ),
]
# Any authenticated caller, the route deciding the answer itself: DELETE (405 to everyone),
# and the erasure receipt (404 to all but the clinic that submitted the erased record).
AnyCaller = Annotated[Principal, Depends(requires())]

# The audit log: auditors only. A clinic's system/*.cruds covers AuditEvent by scope, so the
# role is what keeps others out.
AuditRead = Annotated[Principal, Depends(requires(Rule(Interaction.read, AUDITOR, "AuditEvent")))]
AuditSearch = Annotated[Principal, Depends(requires(Rule(Interaction.search, AUDITOR, "AuditEvent")))]

# Organizations: who the parties are, readable by every role.
OrganizationRead = Annotated[Principal, Depends(requires(Rule(Interaction.read, ALL_ROLES, "Organization")))]
OrganizationSearch = Annotated[
    Principal, Depends(requires(Rule(Interaction.search, ALL_ROLES, "Organization")))
]

# Bulk Data export (service.bulk): receiving authorities only; each exported type also needs
# its read scope (checked by the kick-off). Groups: an authority reads its own.
AUTHORITY = frozenset({Role.authority})
BulkExporter = Annotated[Principal, Depends(requires(Rule(Interaction.export, AUTHORITY, "Patient")))]
GroupRead = Annotated[Principal, Depends(requires(Rule(Interaction.read, AUTHORITY, "Group")))]
GroupSearch = Annotated[Principal, Depends(requires(Rule(Interaction.search, AUTHORITY, "Group")))]

# Erasure: admins only, under a two-person rule the use-case enforces (a 403 of its own).
ADMIN = frozenset({Role.admin})
ErasureRequester = Annotated[
    Principal, Depends(requires(Rule(Interaction.erasure_request, ADMIN, "Patient")))
]
ErasureApprover = Annotated[Principal, Depends(requires(Rule(Interaction.erasure_approve, ADMIN, "Patient")))]
ErasureStatusReader = Annotated[
    Principal, Depends(requires(Rule(Interaction.erasure_status, ADMIN, "Patient")))
]
RetentionHoldSetter = Annotated[
    Principal, Depends(requires(Rule(Interaction.retention_hold, ADMIN, "Patient")))
]
RetentionHoldReleaser = Annotated[
    Principal, Depends(requires(Rule(Interaction.retention_hold_release, ADMIN, "Patient")))
]

# Completion figures: an authority's own (the tasks it owns), a clinic organization's own (the
# tasks it requested, for its programme managers). Counts only; the route reports the caller's
# organization and no other.
FIGURE_READERS = frozenset({Role.authority, Role.clinic})
MeasureEvaluate = Annotated[
    Principal, Depends(requires(Rule(Interaction.evaluate_measure, FIGURE_READERS, "Measure")))
]
MeasureChart = Annotated[
    Principal, Depends(requires(Rule(Interaction.measure_chart, FIGURE_READERS, "Measure")))
]

# Subscriptions (service.subscriptions): a receiving authority manages its own, and reads their
# $status and $events (as reads); clinics, auditors and admins have none.
SubscriptionCreate = Annotated[
    Principal, Depends(requires(Rule(Interaction.create, AUTHORITY, "Subscription")))
]
SubscriptionRead = Annotated[Principal, Depends(requires(Rule(Interaction.read, AUTHORITY, "Subscription")))]
SubscriptionUpdate = Annotated[
    Principal, Depends(requires(Rule(Interaction.update, AUTHORITY, "Subscription")))
]
SubscriptionDelete = Annotated[
    Principal, Depends(requires(Rule(Interaction.delete, AUTHORITY, "Subscription")))
]
SubscriptionSearch = Annotated[
    Principal, Depends(requires(Rule(Interaction.search, AUTHORITY, "Subscription")))
]

"""The consent decision point: the one place that says who may see what.

Every disclosure of clinical data to another organization goes through
:func:`decide`. It is pure: no I/O, no clock (the time is part of the request),
so the same inputs always give the same answer and the rules can be tested
exhaustively. Loading consents and turning FHIR ``Consent`` resources into
:class:`ConsentPolicy` happens elsewhere (``service.records.consent_model``).

The rules, in the order they are applied:

1. Default deny. Nothing is disclosed unless a consent permits it.
2. Only the ``authority`` role can be permitted by consent (``deny.role``). A
   clinic reading its own submissions is tenancy, decided elsewhere; auditors
   and admins never see clinical data.
3. A request that is not well formed (empty ids, a naive ``at``) is denied
   (``deny.request.invalid``): we cannot say it is covered by anything.
4. Only the latest version of each consent (by ``consent_id``) counts, so a
   withdrawal recorded as a new version takes effect on the next request even
   if the caller also passes older versions. Only consents for the request's
   patient count. None left: ``deny.default.no-consent``.
5. A consent counts only while ``status == "active"`` and ``at`` lies in its
   period. Periods are half-open ``[start, end)``; a missing bound is open.
   Any other status (including unknown ones) is treated as not active.
6. Within a consent, provisions form a tree of exceptions (FHIR "nested
   exception rules"). A provision is looked at only if its parent's scope
   matched, and a matching nested provision overrides its parent; when
   siblings disagree, deny wins. Empty criteria in a nested provision inherit
   the enclosing provision's (the scope narrows as you go down).
   * A **permit** matches when its (effective) actors name the requester's
     organization, its purposes name the request's purpose, its classes are
     empty or name the resource type, ``at`` lies in its period, and every
     label of the resource is named in ``security_labels`` of this permit or an
     enclosing permit and is one a consent can grant (:data:`GRANTABLE_LABELS`).
     The request's labels are the resource's *restricting* labels (the caller
     leaves out codes such as confidentiality N that restrict nothing), so a
     label outside :data:`GRANTABLE_LABELS` (confidentiality V, a sensitivity
     code the service does not grant, an unknown code) can never be permitted:
     unknown labels fail closed. Confidentiality R beside a sensitivity label is
     that label's confidentiality (the labeller writes R with every sensitivity
     label), so naming the sensitivity label is enough; R on its own must be
     named. Empty actors or purposes permit *nobody* / *nothing*: a consent must
     name its recipient and purpose.
   * A **deny** matches when each non-empty criterion matches (empty = any),
     ``at`` lies in its period, and, if it lists security labels, the resource
     carries at least one of them.
7. Across consents: any consent whose tree ends in deny beats any permit
   (``deny.provision.deny``). A consent that is active for this patient but not
   well formed also denies (``deny.consent.invalid``): we cannot tell what
   the migrant agreed to, so nothing goes out on its account or anyone's.
8. Otherwise a permit wins: ``permit.statutory`` for a statutory legal basis,
   ``permit.consent`` for voluntary consent. If both permit, the statutory one
   is reported, because that disclosure does not depend on the migrant's
   consent and so does not need undoing if the consent is later withdrawn.
9. Otherwise deny with the most specific reason: the one from the consent that
   got furthest towards permitting, in this order (least to most specific):
   ``deny.actor`` (no consent names this organization), ``deny.consent.not-active``
   (draft, proposed, rejected, entered-in-error), ``deny.consent.withdrawn``
   (inactive), ``deny.consent.not-yet-valid`` / ``deny.consent.expired`` (the
   consent's period, then a matching provision's period), ``deny.purpose``,
   ``deny.class``, ``deny.sensitive-label``. Ties go to the smallest
   ``(consent_id, version)`` so that the answer does not depend on the order of
   the consents.

Statutory-basis consents (public-health notification required by law) use the
same provision logic as voluntary ones; the difference is only recorded in the
rule. Note that a migrant's deny still beats a statutory permit here: whether a
law overrides a refusal is a legal decision that belongs in the statutory
policy itself, not in a default of this function.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from security.roles import Role

ConsentStatus = Literal["active", "inactive", "draft", "proposed", "rejected", "entered-in-error"]
PolicyKind = Literal["voluntary", "statutory"]
ProvisionType = Literal["permit", "deny"]

AUTHORITY_ROLE: Final = Role.authority

# v3-ActCode _ActInformationSensitivityPolicy (terminology.hl7.org): the codes a
# labeller reads as sensitivity labels. Which of them a consent can grant is
# GRANTABLE_LABELS; a resource carrying any other is never disclosed by consent.
SENSITIVE_LABELS: Final[frozenset[str]] = frozenset(
    {
        "BH",  # behavioural health
        "COGN",  # cognitive disability
        "DVD",  # developmental disability
        "EMOTDIS",  # emotional disturbance
        "ETH",  # substance abuse
        "ETHUD",  # alcohol use disorder
        "GDIS",  # genetic disease
        "HIV",  # HIV/AIDS
        "IDS",  # identifier sensitivity
        "MH",  # mental health
        "MST",  # military sexual trauma
        "OPIOIDUD",  # opioid use disorder
        "PREGNANT",  # pregnancy
        "PSY",  # psychiatry disorder
        "PSYTHPN",  # psychotherapy note
        "SCA",  # sickle cell anaemia
        "SDV",  # sexual assault, abuse or domestic violence
        "SEX",  # sexuality and reproductive health
        "SICKLE",  # sickle cell
        "SPI",  # specially protected information
        "STD",  # sexually transmitted disease (syphilis serology, for one)
        "SUD",  # substance use disorder
        "TBOO",  # taboo
        "VIO",  # violence
    }
)

# v3-Confidentiality R (restricted): written with every sensitivity label.
CONFIDENTIALITY_RESTRICTED: Final = "R"

# The labels a permit can grant by naming them (see SECURITY.md, "Security
# labels"). Every one multiplies the label sets materialised as grants, so the
# list is short on purpose: the sensitivity labels the service's rules give or
# that clinics use for this population, and confidentiality R. Confidentiality
# V and every other label are never disclosed to an authority.
GRANTABLE_LABELS: Final[frozenset[str]] = frozenset(
    {"HIV", "MH", "PSY", "SDV", "STD", "SUD", CONFIDENTIALITY_RESTRICTED}
)

# An older sensitivity code -> the code that replaced it, read the same way in
# resources and in consents (ETH, "substance abuse", is now SUD).
LABEL_SYNONYMS: Final[dict[str, str]] = {"ETH": "SUD"}

# Stable rule ids: they go into audit entries, so never rename one.
PERMIT_CONSENT: Final = "permit.consent"
PERMIT_STATUTORY: Final = "permit.statutory"
DENY_NO_CONSENT: Final = "deny.default.no-consent"
DENY_ROLE: Final = "deny.role"
DENY_REQUEST_INVALID: Final = "deny.request.invalid"
DENY_CONSENT_INVALID: Final = "deny.consent.invalid"
DENY_PROVISION: Final = "deny.provision.deny"
DENY_ACTOR: Final = "deny.actor"
DENY_NOT_ACTIVE: Final = "deny.consent.not-active"
DENY_WITHDRAWN: Final = "deny.consent.withdrawn"
DENY_NOT_YET_VALID: Final = "deny.consent.not-yet-valid"
DENY_EXPIRED: Final = "deny.consent.expired"
DENY_PURPOSE: Final = "deny.purpose"
DENY_CLASS: Final = "deny.class"
DENY_SENSITIVE_LABEL: Final = "deny.sensitive-label"
DENY_ERROR: Final = "deny.error"

RULES: Final[frozenset[str]] = frozenset(
    {
        PERMIT_CONSENT,
        PERMIT_STATUTORY,
        DENY_NO_CONSENT,
        DENY_ROLE,
        DENY_REQUEST_INVALID,
        DENY_CONSENT_INVALID,
        DENY_PROVISION,
        DENY_ACTOR,
        DENY_NOT_ACTIVE,
        DENY_WITHDRAWN,
        DENY_NOT_YET_VALID,
        DENY_EXPIRED,
        DENY_PURPOSE,
        DENY_CLASS,
        DENY_SENSITIVE_LABEL,
        DENY_ERROR,
    }
)

# Deeper trees than this are not something a consent form produces; refusing
# them keeps evaluation bounded (and away from RecursionError).
MAX_PROVISION_DEPTH: Final = 16


@dataclass(frozen=True, slots=True)
class Provision:
    """One FHIR ``Consent.provision`` rule, with its nested exceptions."""

    type: ProvisionType
    actors: frozenset[str] = frozenset()  # organization ids
    purposes: frozenset[str] = frozenset()  # v3-ActReason codes
    classes: frozenset[str] = frozenset()  # FHIR resource type names
    security_labels: frozenset[str] = frozenset()
    period_start: dt.datetime | None = None
    period_end: dt.datetime | None = None
    provisions: tuple[Provision, ...] = ()


@dataclass(frozen=True, slots=True)
class ConsentPolicy:
    """One version of one consent (or statutory basis) for one patient."""

    consent_id: str
    version: int
    patient_id: str
    status: ConsentStatus
    policy_kind: PolicyKind
    provision: Provision
    period_start: dt.datetime | None = None
    period_end: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class AccessRequest:
    """Who wants which kind of resource about whom, why, and when."""

    client_id: str
    organization_id: str
    role: str
    purpose: str  # v3-ActReason code, e.g. PUBHLTH
    patient_id: str
    resource_type: str
    security_labels: frozenset[str]  # the resource's restricting labels (service.records.labels)
    at: dt.datetime


@dataclass(frozen=True, slots=True)
class Decision:
    permit: bool
    rule: str
    consent_id: str | None = None
    consent_version: int | None = None


# How far a consent got towards permitting; the highest wins when reporting a
# denial (rule 9 of the module docstring).
_RANK_NONE: Final = 0
_RANK_ACTOR: Final = 1
_RANK_NOT_ACTIVE: Final = 2
_RANK_WITHDRAWN: Final = 3
_RANK_CONSENT_PERIOD: Final = 4
_RANK_PROVISION_PERIOD: Final = 5
_RANK_PURPOSE: Final = 6
_RANK_CLASS: Final = 7
_RANK_LABEL: Final = 8

_Verdict = Literal["permit", "deny", "none"]


@dataclass(frozen=True, slots=True)
class _Finding:
    verdict: _Verdict
    rank: int = _RANK_NONE
    rule: str = DENY_ACTOR


_DENY: Final = _Finding("deny", rule=DENY_PROVISION)
_PERMIT: Final = _Finding("permit", rule=PERMIT_CONSENT)
_NO_MATCH: Final = _Finding("none")


@dataclass(frozen=True, slots=True)
class _Scope:
    """What an enclosing provision passes down to its nested ones."""

    actors: frozenset[str] = frozenset()
    purposes: frozenset[str] = frozenset()
    classes: frozenset[str] = frozenset()
    labels_named: frozenset[str] = frozenset()


_ROOT: Final = _Scope()


def decide(request: AccessRequest, consents: Sequence[ConsentPolicy]) -> Decision:
    """Permit or deny one disclosure; see the module docstring for the rules."""
    try:
        return _decide(request, consents)
    except Exception:
        # A policy decision point fails closed. Everything below checks its
        # input, so this is only reached through a bug or a hostile object
        # (an __eq__ that raises); the rule makes such cases visible in audit.
        return Decision(False, DENY_ERROR)


def _decide(request: AccessRequest, consents: Sequence[ConsentPolicy]) -> Decision:
    if not isinstance(request, AccessRequest):
        return Decision(False, DENY_REQUEST_INVALID)
    if request.role != AUTHORITY_ROLE:
        return Decision(False, DENY_ROLE)
    if not _request_ok(request):
        return Decision(False, DENY_REQUEST_INVALID)

    latest, broken = _latest_versions(consents, request.patient_id)
    if broken:
        return Decision(False, DENY_CONSENT_INVALID)
    mine = [c for c in latest if c.patient_id == request.patient_id]
    if not mine:
        return Decision(False, DENY_NO_CONSENT)

    denies: list[tuple[int, str, int, str]] = []
    permits: list[tuple[int, str, int, str]] = []
    misses: list[tuple[int, str, int, str]] = []
    for consent in mine:
        finding = _consider(consent, request)
        key = (consent.consent_id, consent.version)
        if finding.verdict == "deny":
            # An explicit refusal is reported before a malformed consent.
            denies.append((0 if finding.rule == DENY_PROVISION else 1, *key, finding.rule))
        elif finding.verdict == "permit":
            statutory = consent.policy_kind == "statutory"
            rule = PERMIT_STATUTORY if statutory else PERMIT_CONSENT
            permits.append((0 if statutory else 1, *key, rule))
        else:
            misses.append((-finding.rank, *key, finding.rule))

    # min() over (priority, consent_id, version, rule) makes the choice
    # independent of the order the consents came in.
    if denies:
        _, cid, version, rule = min(denies)
        return Decision(False, rule, cid, version)
    if permits:
        _, cid, version, rule = min(permits)
        return Decision(True, rule, cid, version)
    neg_rank, cid, version, rule = min(misses)
    if -neg_rank <= _RANK_ACTOR:
        # No consent of this patient names the requester: none "decided".
        return Decision(False, DENY_ACTOR)
    return Decision(False, rule, cid, version)


def _consider(consent: ConsentPolicy, request: AccessRequest) -> _Finding:
    """What one consent says about the request (rules 5 to 7)."""
    org = request.organization_id
    if not _consent_ok(consent):
        # A broken withdrawn or draft consent says nothing either way; a broken
        # active one blocks everything (rule 7): we cannot tell what it allows.
        if consent.status == "active":
            return _Finding("deny", rule=DENY_CONSENT_INVALID)
        return _Finding("none", _RANK_ACTOR, DENY_ACTOR)
    if consent.status != "active":
        if not _names_org(consent.provision, org, frozenset()):
            return _Finding("none", _RANK_ACTOR, DENY_ACTOR)
        if consent.status == "inactive":
            return _Finding("none", _RANK_WITHDRAWN, DENY_WITHDRAWN)
        return _Finding("none", _RANK_NOT_ACTIVE, DENY_NOT_ACTIVE)
    when = _when(request.at, consent.period_start, consent.period_end)
    if when != "in":
        if not _names_org(consent.provision, org, frozenset()):
            return _Finding("none", _RANK_ACTOR, DENY_ACTOR)
        rule = DENY_NOT_YET_VALID if when == "before" else DENY_EXPIRED
        return _Finding("none", _RANK_CONSENT_PERIOD, rule)
    finding = _evaluate(consent.provision, request, _ROOT)
    if finding.verdict == "none" and finding.rank == _RANK_NONE:
        # Only deny provisions, none of which matched: nothing here is for us.
        return _Finding("none", _RANK_ACTOR, DENY_ACTOR)
    return finding


def _evaluate(p: Provision, request: AccessRequest, scope: _Scope) -> _Finding:
    """Rule 6: one provision and, if its scope matches, its nested exceptions."""
    actors = p.actors or scope.actors
    purposes = p.purposes or scope.purposes
    classes = p.classes or scope.classes
    when = _when(request.at, p.period_start, p.period_end)

    own: _Finding
    if p.type == "permit":
        if request.organization_id not in actors:
            return _Finding("none", _RANK_ACTOR, DENY_ACTOR)
        if when != "in":
            rule = DENY_NOT_YET_VALID if when == "before" else DENY_EXPIRED
            return _Finding("none", _RANK_PROVISION_PERIOD, rule)
        if request.purpose not in purposes:
            return _Finding("none", _RANK_PURPOSE, DENY_PURPOSE)
        if classes and request.resource_type not in classes:
            return _Finding("none", _RANK_CLASS, DENY_CLASS)
        named = scope.labels_named | p.security_labels
        if _labels_to_name(request.security_labels) <= named & GRANTABLE_LABELS:
            own = _PERMIT
        else:
            # The scope matched, so nested provisions are still looked at: a
            # nested permit may name the label, a nested deny still denies.
            own = _Finding("none", _RANK_LABEL, DENY_SENSITIVE_LABEL)
    else:
        if (
            when != "in"
            or (actors and request.organization_id not in actors)
            or (purposes and request.purpose not in purposes)
            or (classes and request.resource_type not in classes)
            or (p.security_labels and not (p.security_labels & request.security_labels))
        ):
            return _NO_MATCH
        named = scope.labels_named  # a deny names no label for a permit below it
        own = _DENY

    inner = _Scope(actors, purposes, classes, named)
    results = [_evaluate(child, request, inner) for child in p.provisions]
    if any(r.verdict == "deny" for r in results):
        return _DENY
    if any(r.verdict == "permit" for r in results):
        return _PERMIT
    if own.verdict != "none":
        return own
    return max([own, *results], key=lambda r: r.rank)


def _names_org(p: Provision, org: str, inherited: frozenset[str]) -> bool:
    """Does any permit in this tree name ``org`` (directly or by inheritance)?"""
    actors = p.actors or inherited
    if p.type == "permit" and org in actors:
        return True
    return any(_names_org(child, org, actors) for child in p.provisions)


def _when(
    at: dt.datetime, start: dt.datetime | None, end: dt.datetime | None
) -> Literal["before", "in", "after"]:
    if start is not None and at < start:
        return "before"
    if end is not None and at >= end:
        return "after"
    return "in"


def _latest_versions(consents: Iterable[object], patient_id: str) -> tuple[list[ConsentPolicy], bool]:
    """Rule 4: keep the highest version of each consent id.

    The second value is True when the input cannot be trusted for this
    patient: something that is not a ConsentPolicy (we cannot tell whose it
    is), one without a usable id or version, or two different records both
    claiming to be the latest version of the same consent.
    """
    best: dict[str, list[ConsentPolicy]] = {}
    broken = False
    for item in consents:
        if not isinstance(item, ConsentPolicy):
            broken = True
            continue
        if not (_text(item.consent_id) and _integer(item.version)):
            broken = broken or item.patient_id == patient_id
            continue
        seen = best.get(item.consent_id)
        if seen is None or item.version > seen[0].version:
            best[item.consent_id] = [item]
        elif item.version == seen[0].version:
            seen.append(item)
    latest: list[ConsentPolicy] = []
    for group in best.values():
        if any(other != group[0] for other in group[1:]):
            broken = broken or any(c.patient_id == patient_id for c in group)
            continue
        latest.append(group[0])
    return latest, broken


def _labels_to_name(labels: frozenset[str]) -> frozenset[str]:
    """The labels of a resource that a permit must name (rule 6)."""
    if CONFIDENTIALITY_RESTRICTED in labels and labels & SENSITIVE_LABELS:
        return labels - {CONFIDENTIALITY_RESTRICTED}
    return labels


def _request_ok(r: AccessRequest) -> bool:
    return (
        all(_text(v) for v in (r.client_id, r.organization_id, r.purpose, r.patient_id, r.resource_type))
        and _labels(r.security_labels)
        and _aware(r.at)
    )


def _consent_ok(c: ConsentPolicy) -> bool:
    return (
        _text(c.patient_id)
        and c.policy_kind in ("voluntary", "statutory")
        and _period_ok(c.period_start, c.period_end)
        and isinstance(c.provision, Provision)
        and _provision_ok(c.provision, 1)
    )


def _provision_ok(p: Provision, depth: int) -> bool:
    return (
        depth <= MAX_PROVISION_DEPTH
        and p.type in ("permit", "deny")
        and all(_labels(s) for s in (p.actors, p.purposes, p.classes, p.security_labels))
        and _period_ok(p.period_start, p.period_end)
        and isinstance(p.provisions, tuple)
        and all(isinstance(c, Provision) and _provision_ok(c, depth + 1) for c in p.provisions)
    )


def _period_ok(start: object, end: object) -> bool:
    if not all(v is None or _aware(v) for v in (start, end)):
        return False
    if isinstance(start, dt.datetime) and isinstance(end, dt.datetime):
        return start <= end
    return True


def _text(value: object) -> bool:
    return isinstance(value, str) and value != ""


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _labels(value: object) -> bool:
    return isinstance(value, frozenset) and all(isinstance(v, str) for v in value)


def _aware(value: object) -> bool:
    # Comparing naive and aware datetimes raises; a naive time also has no
    # defined instant, so it is refused rather than guessed at.
    return isinstance(value, dt.datetime) and value.utcoffset() is not None

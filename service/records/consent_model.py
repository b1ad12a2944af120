"""FHIR R4 ``Consent`` (a plain dict, as submitted) -> :class:`ConsentPolicy`.

The decision rules live in :mod:`security.consent`; this module only reads.
It never raises on a Consent of any shape: whatever it cannot read makes the
policy *narrower* when it would grant, and *wider* when it would refuse:

* a permit provision with a piece we cannot read or cannot check (a bad
  period, a ``data``/``dataPeriod``/``code`` restriction we do not evaluate,
  an ``action`` without access/disclose, a broken nested provision) becomes a
  permit for nobody, and its nested provisions go with it;
* within a permit, an actor we cannot resolve, a purpose, class or label in a
  code system we do not know, is dropped (it grants nothing);
* within a deny, any such criterion is widened to "any" (the deny covers more),
  a bad period bound is dropped, and ``data``/``dataPeriod``/``code``/``action``
  are ignored, so the deny applies regardless of them;
* a provision without a recognised ``type`` is a deny;
* a Consent that is not a patient-privacy consent, or has no ``provision``,
  permits nothing; an unknown ``status`` is treated as ``entered-in-error``.

Only actors in a recipient role (v3-ParticipationType ``IRCP`` or ``PRCP``)
can be granted anything: the custodian or author of a consent is not thereby
a recipient. Any actor, in any role, can be refused.

Dates without a time are taken as UTC. FHIR ``Period.end`` of a partial date
("2025-12", "2025-12-31") covers that whole month or day, so it becomes the
start of the next one, matching the half-open periods of ``security.consent``.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Collection, Mapping
from typing import Final

from security.consent import (
    LABEL_SYNONYMS,
    MAX_PROVISION_DEPTH,
    ConsentPolicy,
    ConsentStatus,
    PolicyKind,
    Provision,
    ProvisionType,
)

# Same value as service.identity.organizations.ORG_IDENTIFIER_SYSTEM (a test holds them
# together); not imported because that module pulls in the database tables.
ORG_IDENTIFIER_SYSTEM: Final = "https://mhr.example.org/fhir/sid/organization"
RESOURCE_TYPES_SYSTEM: Final = "http://hl7.org/fhir/resource-types"
ACT_REASON_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ACT_CODE_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONFIDENTIALITY_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
CONSENT_SCOPE_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/consentscope"
CONSENT_ACTION_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/consentaction"
PARTICIPATION_TYPE_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"

RECIPIENT_ROLES: Final = frozenset({"IRCP", "PRCP"})
DISCLOSURE_ACTIONS: Final = frozenset({"access", "disclose"})
_STATUSES: Final[dict[object, ConsentStatus]] = {
    "active": "active",
    "inactive": "inactive",
    "draft": "draft",
    "proposed": "proposed",
    "rejected": "rejected",
    "entered-in-error": "entered-in-error",
}
# Labels are sensitivity codes (v3-ActCode) and confidentiality codes; both come out as bare
# codes, as the resource labeller writes them (service.records.labels), with ETH read as SUD.
# An ActCode "code" that is really a confidentiality code is not read: it would stand for R/V.
_LABEL_SYSTEMS: Final = frozenset({ACT_CODE_SYSTEM, CONFIDENTIALITY_SYSTEM})
_CONFIDENTIALITY_CODES: Final = frozenset({"U", "L", "M", "N", "R", "V"})

OrgResolver = Callable[[str, str], "str | None"]

_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_DATETIME = re.compile(
    r"(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<time>\d{2}:\d{2}:\d{2})(?P<frac>\.\d+)?(?P<tz>Z|[+-]\d{2}:\d{2}))?)?)?"
)
_NOBODY: Final = Provision("permit")


def consent_policy_from_fhir(
    resource: object,
    *,
    statutory_policies: Collection[str] = frozenset(),
    resolve_org: OrgResolver | None = None,
    consent_id: str | None = None,
    version: int | None = None,
) -> ConsentPolicy:
    """Read one Consent into the policy that :func:`security.consent.decide` uses.

    ``statutory_policies`` lists the policies that make a Consent a statutory
    legal basis rather than voluntary consent: each entry is compared with
    ``policy[].uri`` and with ``policyRule.coding`` written as ``system|code``.
    ``resolve_org(system, value)`` maps an actor given by identifier (normally
    system :data:`ORG_IDENTIFIER_SYSTEM`) to an organization id, or None;
    without it such actors are unresolved. Its own errors propagate: a lookup
    failure is not the Consent's fault and must not quietly narrow it.
    ``consent_id`` and ``version`` override ``id`` and ``meta.versionId`` (the
    store knows them better than the submitted body).
    """
    doc: Mapping[str, object] = resource if isinstance(resource, Mapping) else {}
    cid = consent_id if consent_id is not None else _str(doc.get("id"))
    ver = version if version is not None else _version(doc.get("meta"))
    status = _status(doc.get("status"))
    patient = _reference_id(doc.get("patient"), "Patient")
    kind = _policy_kind(doc, statutory_policies)

    node = doc.get("provision")
    readable = doc.get("resourceType") == "Consent" and _privacy_scope(doc.get("scope"))
    if readable and isinstance(node, Mapping):
        root = _provision(node, resolve_org or _unresolved, 1)
    else:
        root = _NOBODY
    return ConsentPolicy(
        consent_id=cid,
        version=ver,
        patient_id=patient or "",
        status=status,
        policy_kind=kind,
        provision=root,
        # FHIR R4 has no Consent.period: the root provision's period is it.
        period_start=root.period_start,
        period_end=root.period_end,
    )


def _provision(node: Mapping[str, object], resolve: OrgResolver, depth: int) -> Provision:
    kind: ProvisionType = "permit" if node.get("type") == "permit" else "deny"
    if kind == "permit":
        return _permit(node, resolve, depth) or _NOBODY
    return _deny(node, resolve, depth)


def _permit(node: Mapping[str, object], resolve: OrgResolver, depth: int) -> Provision | None:
    """A permit, or None when any part of it cannot be read or checked."""
    if depth > MAX_PROVISION_DEPTH:
        return None
    # Restrictions to particular data we do not evaluate: granting without
    # them would grant more than the migrant agreed to.
    if any(node.get(key) is not None for key in ("data", "dataPeriod", "code")):
        return None
    actions = node.get("action")
    if actions is not None:
        codes = _codes(_concept_codings(actions), {CONSENT_ACTION_SYSTEM})
        if codes is None or not (codes & DISCLOSURE_ACTIONS):
            return None
    start, end, ok = _period(node.get("period"))
    if not ok:
        return None
    children = _children(node.get("provision"), resolve, depth)
    if children is None:
        return None
    return Provision(
        type="permit",
        actors=frozenset(_recipients(node.get("actor"), resolve)),
        purposes=_codes(_list(node.get("purpose")), {ACT_REASON_SYSTEM}, strict=False) or frozenset(),
        classes=_codes(_list(node.get("class")), {RESOURCE_TYPES_SYSTEM}, strict=False) or frozenset(),
        security_labels=_labels(_list(node.get("securityLabel")), strict=False) or frozenset(),
        period_start=start,
        period_end=end,
        provisions=children,
    )


def _deny(node: Mapping[str, object], resolve: OrgResolver, depth: int) -> Provision:
    start, end, _ = _period(node.get("period"))
    children: tuple[Provision, ...] = ()
    if depth < MAX_PROVISION_DEPTH:
        # Nested provisions of a deny can only be exceptions that grant; one we
        # cannot read is dropped, which leaves the deny standing.
        kids = [
            _provision(k, resolve, depth + 1) for k in _list(node.get("provision")) if isinstance(k, Mapping)
        ]
        children = tuple(k for k in kids if k != _NOBODY)
    return Provision(
        type="deny",
        actors=_deny_actors(node.get("actor"), resolve),
        purposes=_codes(_list(node.get("purpose")), {ACT_REASON_SYSTEM}) or frozenset(),
        classes=_codes(_list(node.get("class")), {RESOURCE_TYPES_SYSTEM}) or frozenset(),
        security_labels=_labels(_list(node.get("securityLabel"))) or frozenset(),
        period_start=start,
        period_end=end,
        provisions=children,
    )


def _children(value: object, resolve: OrgResolver, depth: int) -> tuple[Provision, ...] | None:
    """Nested provisions of a permit; None if any cannot be read (it may be a deny)."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(k, Mapping) for k in value):
        return None
    if value and depth >= MAX_PROVISION_DEPTH:
        return None
    return tuple(_provision(k, resolve, depth + 1) for k in value)


def _recipients(value: object, resolve: OrgResolver) -> list[str]:
    found: list[str] = []
    for actor in _list(value):
        if not isinstance(actor, Mapping):
            continue
        roles = _codes(_concept_codings(actor.get("role")), {PARTICIPATION_TYPE_SYSTEM}, False)
        if not roles or not (roles & RECIPIENT_ROLES):
            continue
        org = _actor_org(actor.get("reference"), resolve)
        if org is not None:
            found.append(org)
    return found


def _deny_actors(value: object, resolve: OrgResolver) -> frozenset[str]:
    orgs: set[str] = set()
    for actor in _list(value):
        org = _actor_org(actor.get("reference"), resolve) if isinstance(actor, Mapping) else None
        if org is None:
            return frozenset()  # an actor we cannot tell: refuse everyone
        orgs.add(org)
    return frozenset(orgs)


def _actor_org(ref: object, resolve: OrgResolver) -> str | None:
    if not isinstance(ref, Mapping):
        return None
    if ref.get("reference") is not None:
        return _reference_id(ref, "Organization")
    ident = ref.get("identifier")
    if isinstance(ident, Mapping):
        system, value = ident.get("system"), ident.get("value")
        if isinstance(system, str) and isinstance(value, str) and system and value:
            return resolve(system, value)
    return None


def _unresolved(system: str, value: str) -> str | None:
    return None


def _codes(codings: list[object], systems: Collection[str], strict: bool = True) -> frozenset[str] | None:
    """Codes of the codings in ``systems``.

    strict (deny): any coding outside them makes the whole set None, so the
    caller widens the criterion to "any". Not strict (permit): they are dropped.
    """
    codes: set[str] = set()
    for coding in codings:
        system = coding.get("system") if isinstance(coding, Mapping) else None
        code = coding.get("code") if isinstance(coding, Mapping) else None
        if system in systems and isinstance(code, str) and code:
            codes.add(code)
        elif strict:
            return None
    return frozenset(codes)


def _labels(codings: list[object], strict: bool = True) -> frozenset[str] | None:
    """Security label codes, as :func:`_codes` (strict for a deny), in the labeller's vocabulary."""
    readable: list[object] = []
    for coding in codings:
        system = coding.get("system") if isinstance(coding, Mapping) else None
        code = coding.get("code") if isinstance(coding, Mapping) else None
        if system == ACT_CODE_SYSTEM and isinstance(code, str):
            if code in _CONFIDENTIALITY_CODES:
                if strict:
                    return None
                continue
            coding = {"system": system, "code": LABEL_SYNONYMS.get(code, code)}
        readable.append(coding)
    return _codes(readable, _LABEL_SYSTEMS, strict)


def _concept_codings(value: object) -> list[object]:
    """Codings of a CodeableConcept, or of a list of them (R4 action is a list)."""
    concepts = value if isinstance(value, list) else [value]
    out: list[object] = []
    for concept in concepts:
        if isinstance(concept, Mapping):
            out.extend(_list(concept.get("coding")))
    return out


def _privacy_scope(value: object) -> bool:
    codes = _codes(_concept_codings(value), {CONSENT_SCOPE_SYSTEM}, strict=False)
    return codes is not None and "patient-privacy" in codes


def _policy_kind(doc: Mapping[str, object], statutory: Collection[str]) -> PolicyKind:
    uris = [p.get("uri") for p in _list(doc.get("policy")) if isinstance(p, Mapping)]
    tokens = [
        f"{c.get('system')}|{c.get('code')}"
        for c in _concept_codings(doc.get("policyRule"))
        if isinstance(c, Mapping)
    ]
    if any(isinstance(v, str) and v in statutory for v in [*uris, *tokens]):
        return "statutory"
    return "voluntary"


def _status(value: object) -> ConsentStatus:
    # We cannot tell what an unknown status means, so the consent is void.
    return _STATUSES.get(value, "entered-in-error") if isinstance(value, str) else "entered-in-error"


def _reference_id(ref: object, resource_type: str) -> str | None:
    """``{"reference": "Type/id"}`` -> id; absolute or versioned refs are refused.

    An absolute URL may name a resource on another server that happens to
    share a local id.
    """
    text = ref.get("reference") if isinstance(ref, Mapping) else None
    if not isinstance(text, str):
        return None
    prefix, _, rid = text.partition("/")
    if prefix != resource_type or not _FHIR_ID.fullmatch(rid):
        return None
    return rid


def _version(meta: object) -> int:
    text = meta.get("versionId") if isinstance(meta, Mapping) else None
    if isinstance(text, str) and text.isascii() and text.isdigit() and len(text) <= 18:
        return int(text)
    return 0


def _period(value: object) -> tuple[dt.datetime | None, dt.datetime | None, bool]:
    """(start, end, all readable); an unreadable bound comes back as None."""
    if value is None:
        return None, None, True
    if not isinstance(value, Mapping):
        return None, None, False
    start, start_ok = _instant(value.get("start"), end=False)
    end, end_ok = _instant(value.get("end"), end=True)
    if start is not None and end is not None and start > end:
        return None, None, False
    return start, end, start_ok and end_ok


def _instant(value: object, *, end: bool) -> tuple[dt.datetime | None, bool]:
    """A FHIR dateTime as an aware UTC datetime; partial ends round up."""
    if value is None:
        return None, True
    match = _DATETIME.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return None, False
    try:
        if match["time"] is not None:
            frac = (match["frac"] or "")[:7]  # fromisoformat takes up to 6 digits
            tz = "+00:00" if match["tz"] == "Z" else match["tz"]
            text = f"{match['y']}-{match['m']}-{match['d']}T{match['time']}{frac}{tz}"
            return dt.datetime.fromisoformat(text).astimezone(dt.UTC), True
        year, month, day = int(match["y"]), int(match["m"] or 1), int(match["d"] or 1)
        first = dt.datetime(year, month, day, tzinfo=dt.UTC)
    except (ValueError, OverflowError):
        return None, False  # 2025-02-30, 24:00:00, an offset past the year 1 ...
    if not end:
        return first, True
    try:
        if match["d"] is not None:
            return first + dt.timedelta(days=1), True
        if match["m"] is not None:
            return (first + dt.timedelta(days=32)).replace(day=1), True
        return first.replace(year=year + 1), True
    except (ValueError, OverflowError):
        return None, True  # an end in the last day of 9999: an open end says the same


def _list(value: object) -> list[object]:
    return list(value) if isinstance(value, list) else []


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""

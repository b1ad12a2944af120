"""Materialised consent decisions ("grants") that SQL can join against.

:func:`security.consent.decide` answers one request at a time. A search over
many migrants has to filter in SQL before paging, so whenever any Consent of a
migrant changes the store recomputes that migrant's complete set of grants with
:func:`materialise_grants` and replaces the stored rows. A row says: this
organization, for this purpose, may see resources of this type carrying exactly
this set of labels, during ``[valid_from, valid_to)``, on the authority of this
consent version and rule. The rows are computed by calling ``decide`` itself, so
they agree with it by construction; the reasoning below is only about which
calls are enough to cover every request ``decide`` could permit.

Why a finite number of calls suffices (checked against ``security.consent``):

* **Role and client.** Only ``role == "authority"`` can ever be permitted (rule
  2), so grants are computed for that role only. ``decide`` reads ``client_id``
  only to check that it is a non-empty string (``_request_ok``); it never
  compares it with anything, so a fixed placeholder stands for every client.
* **Organizations and purposes.** A permit needs the requester's organization
  in the *effective* actors of some permit provision and the purpose in its
  effective purposes (empty = nobody / nothing). Effective criteria are
  inherited from the enclosing provision when a provision's own are empty, and
  the enclosing provision may be a *deny* (``deny(actors={A}, provisions=
  (permit(purposes={P}),))`` permits A). So the candidates are the actors and
  purposes named by *any* provision, permit or deny, at any depth, of any
  consent passed in. Any other organization or purpose is always denied.
* **Resource types.** A permit with empty classes covers every type, so the
  types cannot be read off the consents; the caller says which types exist
  (``resource_types``). A resource of any other type matches no grant: denied.
* **Labels.** The label set of a resource matters in two ways: every sensitive
  label must be named by a matching permit, and a deny listing labels applies
  if the resource carries any of them (sensitive or not). Grants are therefore
  per *exact* label set: every subset of ``label_universe`` (the labels a
  consent can grant, ``GRANTABLE_LABELS``). The store must match a resource by
  its exact label set; a resource carrying a label outside the universe matches
  no grant and is denied (fails closed; ``decide`` denies it too, since it
  permits no label outside ``GRANTABLE_LABELS``).
* **Time.** ``decide`` looks at ``at`` only through half-open ``[start, end)``
  tests against consent and provision periods (``_when``: ``at < start`` is
  before, ``at >= end`` is after). With all those bounds sorted as
  ``b0 < b1 < ... < bn``, the answer is constant on ``(-inf, b0)``, on each
  ``[bi, bi+1)`` and on ``[bn, +inf)``. We evaluate at ``bi`` itself (start is
  inclusive) and at ``b0 - 1 microsecond`` for the first interval, computed in
  UTC: wall-clock arithmetic on a zone with daylight saving can land *after*
  ``b0`` (02:59:59.999999 on a spring-forward day does not exist and maps to
  the later instant). Malformed bounds (naive datetimes) make their consent
  malformed, which ``decide`` treats the same at every instant, so they are
  not boundaries. Caveat: Python compares two datetimes that share the *same*
  ``tzinfo`` object by wall clock; a request whose ``at`` shares a DST zone
  object with a consent bound can therefore disagree with the grants inside a
  DST gap or fold. ``service.records.consent_model`` stores bounds in UTC and requests
  use UTC, where wall clock and instant agree.

Adjacent intervals with the same decision (rule, consent id, version) are
merged; one grant is emitted per permitting interval. Bounds are returned in
UTC (for the few instants within a day of ``datetime.min``/``max`` that UTC
cannot represent, as the same instant with its fixed UTC offset).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, TypeGuard

from security.consent import (
    AUTHORITY_ROLE,
    GRANTABLE_LABELS,
    MAX_PROVISION_DEPTH,
    SENSITIVE_LABELS,
    AccessRequest,
    ConsentPolicy,
    Decision,
    Provision,
    decide,
)

# The most labels we expand into subsets: 2**8 = 256 label sets per
# (organization, purpose, resource type), each one a decide call per interval.
MAX_LABEL_UNIVERSE: Final = 8

# decide() checks that client_id is a non-empty string and otherwise ignores it.
GRANT_CLIENT_ID: Final = "consent-grants"

_TICK: Final = dt.timedelta(microseconds=1)
_MAX_OFFSET: Final = dt.timedelta(hours=24)  # exclusive bound of a timezone offset
# Any instant will do when no consent has a bound: the answer is the same always.
_ANY_INSTANT: Final = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class Grant:
    """One permitting interval of decide() for one kind of resource."""

    organization_id: str
    purpose: str
    resource_type: str
    labels: frozenset[str]  # the exact label set of a resource this covers (empty = unlabelled)
    valid_from: dt.datetime | None  # None = since forever
    valid_to: dt.datetime | None  # None = open-ended; half-open [from, to)
    rule: str  # Decision.rule at that time (permit.consent / permit.statutory)
    consent_id: str
    consent_version: int

    def covers(self, at: dt.datetime) -> bool:
        """Is ``at`` inside ``[valid_from, valid_to)``?"""
        return (self.valid_from is None or self.valid_from <= at) and (
            self.valid_to is None or at < self.valid_to
        )


def materialise_grants(
    patient_id: str,
    consents: Sequence[ConsentPolicy],
    *,
    resource_types: Iterable[str],
    label_universe: Iterable[str],
) -> list[Grant]:
    """Every grant ``decide`` implies for ``patient_id`` under ``consents``.

    ``consents`` is exactly what ``decide`` would be given for this patient (all
    stored versions; other patients' consents may be included, as for
    ``decide``). The result is sorted; see :func:`grant_sort_key`.
    """
    types = _names(resource_types, "resource type")
    universe = _names(label_universe, "label")
    if len(universe) > MAX_LABEL_UNIVERSE:
        raise ValueError(f"label universe has {len(universe)} labels, at most {MAX_LABEL_UNIVERSE} allowed")
    nodes = [(c, list(_provisions(c))) for c in consents if isinstance(c, ConsentPolicy)]
    # Pruning that cannot change an answer (decide() reads the resource type only
    # through provision classes, and permits a sensitive label only where a permit
    # names it): a sensitive label no provision names, or one no consent can
    # grant, can only ever deny, and without classes every resource type gets
    # the same answer as the first.
    named_labels = {label for _, ps in nodes for p in ps for label in _strings(p.security_labels)}
    universe = [
        label
        for label in universe
        if label in GRANTABLE_LABELS and (label in named_labels or label not in SENSITIVE_LABELS)
    ]
    by_class = any(any(True for _ in _strings(p.classes)) for _, ps in nodes for p in ps)
    evaluated_types = types if by_class or not types else types[:1]
    sizes = range(len(universe) + 1)
    label_sets = [frozenset(c) for n in sizes for c in itertools.combinations(universe, n)]

    organizations = sorted({a for _, ps in nodes for p in ps for a in _strings(p.actors)})
    purposes = sorted({u for _, ps in nodes for p in ps for u in _strings(p.purposes)})
    bounds = sorted(
        {
            _to_utc(b)
            for c, ps in nodes
            for b in (c.period_start, c.period_end, *(x for p in ps for x in (p.period_start, p.period_end)))
            if _aware(b)
        }
    )
    intervals = _intervals(bounds)

    grants: list[Grant] = []
    for org, purpose, rtype, labels in itertools.product(
        organizations, purposes, evaluated_types, label_sets
    ):
        run: tuple[Decision, dt.datetime | None, dt.datetime | None] | None = None
        for start, end, instant in intervals:
            request = AccessRequest(
                client_id=GRANT_CLIENT_ID,
                organization_id=org,
                role=AUTHORITY_ROLE,
                purpose=purpose,
                patient_id=patient_id,
                resource_type=rtype,
                security_labels=labels,
                at=instant,
            )
            decision = decide(request, consents)
            if run is not None and run[0] == decision:
                run = (decision, run[1], end)  # same answer: extend the interval
                continue
            if run is not None:
                grants.extend(_grant(org, purpose, rtype, labels, *run))
            run = (decision, start, end)
        if run is not None:
            grants.extend(_grant(org, purpose, rtype, labels, *run))
    if evaluated_types != types:
        grants = [dataclasses.replace(g, resource_type=t) for g in grants for t in types]
    grants.sort(key=grant_sort_key)
    return grants


def grant_sort_key(g: Grant) -> tuple[str, str, str, int, tuple[str, ...], tuple[int, dt.datetime | None]]:
    """Order: organization, purpose, type, label set (smaller first), then time."""
    since = (0, None) if g.valid_from is None else (1, g.valid_from)
    return (g.organization_id, g.purpose, g.resource_type, len(g.labels), tuple(sorted(g.labels)), since)


def _grant(
    org: str,
    purpose: str,
    rtype: str,
    labels: frozenset[str],
    decision: Decision,
    start: dt.datetime | None,
    end: dt.datetime | None,
) -> list[Grant]:
    if not decision.permit or decision.consent_id is None or decision.consent_version is None:
        return []
    return [
        Grant(
            organization_id=org,
            purpose=purpose,
            resource_type=rtype,
            labels=labels,
            valid_from=start,
            valid_to=end,
            rule=decision.rule,
            consent_id=decision.consent_id,
            consent_version=decision.consent_version,
        )
    ]


def _intervals(
    bounds: list[dt.datetime],
) -> list[tuple[dt.datetime | None, dt.datetime | None, dt.datetime]]:
    """(start, end, an instant inside) for each piece of the time line, in order."""
    if not bounds:
        return [(None, None, _ANY_INSTANT)]
    pieces: list[tuple[dt.datetime | None, dt.datetime | None, dt.datetime]] = []
    before = _instant_before(bounds[0])
    if before is not None:  # otherwise bounds[0] is the earliest instant there is
        pieces.append((None, bounds[0], before))
    for start, end in itertools.pairwise([*bounds, None]):
        assert start is not None
        pieces.append((start, end, start))  # [start, end) contains start
    return pieces


def _instant_before(b: dt.datetime) -> dt.datetime | None:
    """The instant one microsecond before ``b`` (instant arithmetic, not wall clock)."""
    offset = b.utcoffset()
    assert offset is not None
    fixed = b.replace(tzinfo=dt.timezone(offset))  # the same instant, without DST rules
    try:
        return (fixed - _TICK).astimezone(dt.UTC)
    except OverflowError:
        pass
    try:
        return fixed - _TICK
    except OverflowError:
        pass
    # The wall clock is datetime.min: only a larger offset reaches further back.
    if offset + _TICK < _MAX_OFFSET:
        return b.replace(tzinfo=dt.timezone(offset + _TICK))
    return None


def _to_utc(b: dt.datetime) -> dt.datetime:
    offset = b.utcoffset()
    assert offset is not None
    fixed = b.replace(tzinfo=dt.timezone(offset))
    try:
        return fixed.astimezone(dt.UTC)
    except OverflowError:  # within a day of datetime.min / datetime.max
        return fixed


def _provisions(consent: ConsentPolicy) -> Iterator[Provision]:
    """Every provision of a consent, as deep as decide() would look."""
    stack: list[tuple[object, int]] = [(consent.provision, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, Provision) or depth > MAX_PROVISION_DEPTH:
            continue  # the consent is malformed: decide() denies on it at every instant
        yield node
        if isinstance(node.provisions, tuple):
            stack.extend((child, depth + 1) for child in node.provisions)


def _strings(values: object) -> Iterator[str]:
    if isinstance(values, frozenset):
        yield from (v for v in values if isinstance(v, str) and v)


def _aware(value: object) -> TypeGuard[dt.datetime]:
    return isinstance(value, dt.datetime) and value.utcoffset() is not None


def _names(values: Iterable[str], what: str) -> list[str]:
    out: set[str] = set()
    for v in values:
        if not isinstance(v, str) or not v:
            raise ValueError(f"{what} must be a non-empty string: {v!r}")
        out.add(v)
    return sorted(out)

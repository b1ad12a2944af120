"""Which authorities a write concerns, and the events and withdrawal notices it causes.

Called by the intake in the transaction of the write (service.records.intake): :meth:`WriteWatch.begin`
before a migrant's grants are recomputed, :meth:`WriteWatch.finish` after. Who may see what is
answered by the grant predicate (``service.records.grant_predicate.admits``, the rule every read
filters with), over the migrant's current versions, before and after:

- a version the write created that an authority may now see, or an older one a new consent
  admitted, is a ``record-visible`` event for that authority (and purpose of use);
- a version an authority could see before a consent change and no longer can is a withdrawal or
  narrowing of the consents that admitted it. Every authority that already received data under
  such a consent (the disclosure accounting) is told: a ``consent-withdrawn`` event (focus: the
  Consent) and an entry on the disclosure accounting saying that, and whether, it was notified.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import Table, and_, bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from service.audit.disclosures import (
    WITHDRAWAL_NOTICE,
    Disclosure,
    anything_disclosed,
    disclosures_for_patient,
)
from service.audit.events import Action, AuditAgent, AuditEntity, AuditRecord, EventType, Outcome
from service.audit.recorder import record_audit
from service.core.request_context import SOURCE, current_request_id
from service.records.grant_predicate import GRANTS, admits
from service.records.write_observers import Written
from service.store.database import at_commit
from service.store.tables import ResourceVersion, StoredResource, UtcDateTime
from service.subscriptions.events import Event, Focus, publish
from service.subscriptions.repository import SubscriptionRepository
from service.subscriptions.topics import Topic

# The disclosure-accounting entry of a withdrawal notice (event type disclosure: it tells the
# authority something about the migrant, the Consent's id).
NOTICE_SUBTYPE = WITHDRAWAL_NOTICE
NOTIFIED = "notified"  # through its consent-withdrawn subscription
NOT_SUBSCRIBED = "no-subscription"  # the authority has none: told nobody, and the migrant sees so

# Provenance is the write's own bookkeeping, seen with the record: no event of its own.
_NOT_EVENTS = frozenset({"Provenance"})

_VERSIONS = cast(Table, ResourceVersion.__table__)
_CURRENT = cast(Table, StoredResource.__table__)


@dataclass(frozen=True)
class Admission:
    """An authority (for a purpose) may see a current version, under a grant from this consent."""

    organization_id: str
    purpose: str
    consent_id: str
    resource_type: str
    resource_id: str
    version_id: int
    subject_id: str

    @property
    def seen(self) -> tuple[str, str, str, str, int]:
        return (self.organization_id, self.purpose, self.resource_type, self.resource_id, self.version_id)


async def admissions(session: AsyncSession, subject_ids: Iterable[str], at: datetime) -> list[Admission]:
    """Every (authority, purpose, consent) that may see each current version of these migrants at ``at``."""
    wanted = sorted(set(subject_ids))
    if not wanted:
        return []
    v = _VERSIONS.alias("version")
    r = _CURRENT.alias("current")
    g = GRANTS.alias("grant_admits")
    statement = (
        select(
            g.c.organization_id,
            g.c.purpose,
            g.c.consent_id,
            v.c.resource_type,
            v.c.id,
            v.c.version_id,
            v.c.subject_id,
        )
        .select_from(
            r.join(
                v,
                and_(
                    v.c.resource_type == r.c.resource_type,
                    v.c.id == r.c.id,
                    v.c.version_id == r.c.version_id,
                ),
            ).join(g, admits(g, v, bindparam("admits_at", at, type_=UtcDateTime())))
        )
        .where(r.c.subject_id.in_(wanted))
    )
    rows = await session.execute(statement)
    return [Admission(*row) for row in rows]


class WriteWatch:
    """Watches one write's migrants across their grant recomputation."""

    def __init__(
        self,
        before: list[Admission],
        consent_subjects: frozenset[str],
        at: datetime,
        wants_records: bool | None = None,
    ) -> None:
        self._before = before
        self._consent_subjects = consent_subjects
        self._at = at
        self._wants_records = wants_records  # None: not looked up yet

    @classmethod
    async def begin(cls, session: AsyncSession, consent_subjects: Iterable[str], at: datetime) -> WriteWatch:
        """Before the grants change: what the migrants whose Consents the write changes showed to whom.
        (Migrants created by the write had nothing to show: leave them out.)

        The snapshot serves two things only: record events for older versions a new consent
        admits (wanted only if some subscription records them) and withdrawal notices (owed only
        to authorities that received data about these migrants). When neither can arise, two
        index lookups stand in for the snapshot, which joins every current version of the
        migrants with their grants."""
        subjects = frozenset(consent_subjects)
        if not subjects:
            return cls([], subjects, at)
        wants_records = await SubscriptionRepository(session).any_recording(Topic.record_visible.value)
        if not wants_records and not await anything_disclosed(session, subjects):
            return cls([], subjects, at, wants_records)
        return cls(await admissions(session, subjects, at), subjects, at, wants_records)

    async def finish(
        self,
        session: AsyncSession,
        written: Sequence[Written],
        consent_versions: dict[str, int],
        agent: AuditAgent,
    ) -> list[Event]:
        """After the grants changed: publish what the write made visible, and the withdrawal notices.

        ``consent_versions``: the current version of every Consent the write wrote (by id).
        Returns the events, published (fanned out to subscriptions) when the transaction commits.
        """
        subjects = {w.subject_id for w in written} | self._consent_subjects
        wants_records = self._wants_records
        if wants_records is None:
            wants_records = await SubscriptionRepository(session).any_recording(Topic.record_visible.value)
        if not wants_records and not self._before:
            return []
        after = await admissions(session, subjects, self._at)
        events = self._record_events(after, written) if wants_records else []
        events += await self._withdrawal_notices(session, after, consent_versions, agent)

        # Published as the transaction's last statements: numbering them locks each subscription's
        # event counter until COMMIT, and every intake publishing to it waits for that lock.
        async def publish_last() -> None:
            await publish(session, events)

        at_commit(session, publish_last)
        return events

    def _record_events(self, after: list[Admission], written: Sequence[Written]) -> list[Event]:
        new_versions = {(w.resource_type, w.resource_id, w.version_id) for w in written}
        seen_before = {a.seen for a in self._before}
        events = []
        for a in sorted(
            after, key=lambda a: (a.subject_id, a.resource_type, a.resource_id, a.organization_id)
        ):
            if a.resource_type in _NOT_EVENTS:
                continue
            written_now = (a.resource_type, a.resource_id, a.version_id) in new_versions
            # An older version is news only where this write changed the migrant's consents.
            newly_admitted = a.subject_id in self._consent_subjects and a.seen not in seen_before
            if written_now or newly_admitted:
                events.append(
                    Event(
                        Topic.record_visible,
                        a.organization_id,
                        Focus(a.resource_type, a.resource_id, a.version_id),
                        subject_id=a.subject_id,
                        purpose=a.purpose,
                    )
                )
        return events

    async def _withdrawal_notices(
        self,
        session: AsyncSession,
        after: list[Admission],
        consent_versions: dict[str, int],
        agent: AuditAgent,
    ) -> list[Event]:
        still_seen = {a.seen for a in after}
        # (subject, consent) -> organizations that lost sight of something that consent admitted.
        lost: dict[tuple[str, str], set[str]] = defaultdict(set)
        for a in self._before:
            if a.seen not in still_seen:
                lost[(a.subject_id, a.consent_id)].add(a.organization_id)
        if not lost:
            return []
        repo = SubscriptionRepository(session)
        events: list[Event] = []
        for subject_id in sorted({s for s, _ in lost}):
            received = _recipients_by_consent(await disclosures_for_patient(session, subject_id))
            for (subject, consent_id), organizations in sorted(lost.items()):
                if subject != subject_id:
                    continue
                told = sorted(organizations & received.get(consent_id, set()))
                if not told:
                    continue
                version = consent_versions.get(consent_id) or await _current_version(session, consent_id)
                focus = Focus("Consent", consent_id, version)
                subscribed = {
                    r.organization_id for r in await repo.recipients(Topic.consent_withdrawn.value, told)
                }
                for org in told:
                    if org in subscribed:
                        events.append(Event(Topic.consent_withdrawn, org, focus, subject_id=subject_id))
                    await record_audit(
                        session,
                        _notice_record(
                            agent, org, subject_id, focus, NOTIFIED if org in subscribed else NOT_SUBSCRIBED
                        ),
                        request_id=current_request_id(),
                        source=SOURCE,
                    )
        return events


def _recipients_by_consent(disclosures: Iterable[Disclosure]) -> dict[str, set[str]]:
    """Consent id -> organizations that received data under it (earlier notices are not data)."""
    found: dict[str, set[str]] = defaultdict(set)
    for d in disclosures:
        if not d.consent or d.subtype == NOTICE_SUBTYPE:
            continue
        consent_id = d.consent.removeprefix("Consent/").split("/", 1)[0]
        found[consent_id].update(d.organizations)
    return found


async def _current_version(session: AsyncSession, consent_id: str) -> int | None:
    row = await session.get(StoredResource, ("Consent", consent_id))
    return None if row is None else row.version_id


def _notice_record(
    agent: AuditAgent, organization_id: str, subject_id: str, focus: Focus, detail: str
) -> AuditRecord:
    return AuditRecord(
        event_type=EventType.disclosure,
        subtype=NOTICE_SUBTYPE,
        action=Action.execute,
        outcome=Outcome.success,
        agent=agent,
        entities=(AuditEntity("Consent", focus.resource_id, focus.version_id),),
        patient_ids=(subject_id,),
        consent_id=focus.resource_id,
        consent_version=focus.version_id,
        detail=detail,
        recipients=(organization_id,),
    )

"""Follow-up tasks for an intake: an exam or a Consent can disclose a follow-up classification
to an authority, or stop disclosing it; the migrant's tasks follow in the same transaction.

Loaded by service.records.write_observers.
"""

from __future__ import annotations

from datetime import datetime

from service.records.repository import RecordRepository
from service.records.write_observers import CommittedWrite, WriteObserver
from service.tasks.service import reconcile_subject

# The resource types whose writes can change which authority a classification is disclosed to.
FOLLOWUP_TRIGGERS = frozenset({"Observation", "Consent"})


class FollowupTasks:
    def __init__(self) -> None:
        self._regranted: frozenset[str] = frozenset()

    async def before_grants(self, repo: RecordRepository, subjects: frozenset[str], at: datetime) -> None:
        # Tasks are decided on the grants as they are after the write; these migrants' grants
        # are recomputed (their Consents changed, or a relabel), so their cases are looked at.
        self._regranted = subjects

    async def after_grants(self, write: CommittedWrite) -> None:
        written = {w.subject_id for w in write.written if w.resource_type in FOLLOWUP_TRIGGERS}
        subjects = sorted(written | self._regranted)
        for subject_id in subjects:
            await reconcile_subject(write.services, write.repo, write.keys, subject_id, write.at)


def observer() -> WriteObserver:
    return FollowupTasks()

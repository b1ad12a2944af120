"""Erase one migrant: destroy everything that could decrypt or link their data, in one transaction.

Destroyed: the wrapped subject key (so every version, in the database and in any backup
taken after the next KEK epoch, is unreadable), the blind-index search tokens of their
resources, their match keys (identifier hashes for ``ifNoneExist``), the remembered answers
of writes naming them (Idempotency-Key, Bundle.identifier), their disclosure grants, the
label-set tokens of their versions and the clinical dates kept in clear for search.

Kept, on purpose: the pseudonymous resource rows and their ciphertexts. Without the key
they are noise, and the audit trail names each disclosed version by its ciphertext hash:
keeping the bytes keeps those hashes checkable (`mhr audit verify` covers the log itself,
which erasure never touches). The subject row stays too, with ``erased_at`` set, so that
the read paths can tell "erased" (410 to the submitting clinic) from "never existed".

The caller owns the transaction (a request's session, or a job's); nothing here commits.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from service.erasure.repository import ErasureRepository


class AlreadyErased(Exception):
    """The migrant was erased before: erasing twice has no second effect."""


class NoSuchSubject(Exception):
    """No migrant with this pseudonymous id."""


@dataclass(frozen=True)
class Destroyed:
    """What one erasure destroyed (row counts), for its receipt."""

    subject_keys: int
    search_tokens: int
    match_keys: int
    remembered_writes: int
    disclosure_grants: int
    label_tokens: int
    clinical_dates: int
    versions_kept_unreadable: int

    def lines(self) -> list[str]:
        return [
            f"destroyed subject-key {self.subject_keys}",
            f"destroyed search-tokens {self.search_tokens}",
            f"destroyed match-keys {self.match_keys}",
            f"destroyed remembered-writes {self.remembered_writes}",
            f"destroyed disclosure-grants {self.disclosure_grants}",
            f"destroyed label-tokens {self.label_tokens}",
            f"destroyed clinical-dates {self.clinical_dates}",
            f"kept-unreadable resource-versions {self.versions_kept_unreadable}",
        ]


async def erase_subject(
    session: AsyncSession, subject_id: str, *, organization_id: str | None, at: datetime
) -> Destroyed:
    """Destroy what decrypts or links this migrant; raise AlreadyErased / NoSuchSubject.

    ``organization_id``: the submitting clinic, whose remembered write answers are searched
    (None: the clinic that submitted the migrant's Patient resource)."""
    repo = ErasureRepository(session)
    subject = await repo.subject_for_update(subject_id)
    if subject is None:
        raise NoSuchSubject
    if subject.erased_at is not None or subject.wrapped_key is None:
        raise AlreadyErased
    clinic = organization_id or await repo.submitting_organization(subject_id)
    remembered = await repo.delete_remembered_writes(subject_id, clinic) if clinic is not None else 0
    search_tokens = await repo.delete_search_tokens(subject_id)
    match_keys = await repo.delete_match_keys(subject_id)
    grants = await repo.delete_grants(subject_id)
    label_tokens, kept = await repo.clear_label_tokens(subject_id)
    dates = await repo.clear_clinical_dates(subject_id)
    keys = await repo.destroy_key(subject_id, at)
    if keys != 1:  # a concurrent erasure won the row (SQLite has no row lock): nothing half-done
        raise AlreadyErased
    # The ORM's copy of the row is stale now: nothing in this session may read the old key.
    session.expire(subject)
    return Destroyed(keys, search_tokens, match_keys, remembered, grants, label_tokens, dates, kept)

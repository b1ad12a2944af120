"""Sealing and opening stored resource versions: canonical JSON bytes under the subject key."""

from __future__ import annotations

import logging
from typing import Protocol

from security.envelope import IntegrityError, resource_aad
from security.keys import KekRetired
from service.domain.errors import Gone, IntegrityFailure, Unavailable
from service.records.repository import VersionRow
from service.records.subject_keys import OpenedKeys, SubjectErased

log = logging.getLogger(__name__)


class WrappedKey(Protocol):
    """A migrant's wrapped data key: a ``subjects`` row, or the columns of it a read fetched."""

    @property
    def id(self) -> str: ...

    @property
    def wrapped_key(self) -> bytes | None: ...

    @property
    def key_version(self) -> int: ...


def integrity_failure(row: VersionRow) -> IntegrityFailure:
    # An integrity event: logged with pseudonymous coordinates only, answered opaquely.
    log.error(
        "stored resource failed its integrity check",
        extra={
            "event": "integrity",
            "resource_type": row.resource_type,
            "resource_id": row.id,
            "version_id": row.version_id,
        },
    )
    return IntegrityFailure("stored data failed its integrity check")


def erased(resource_type: str) -> Gone:
    """The answer to the clinic that submitted an erased migrant's data (everyone else: 404)."""
    return Gone(f"{resource_type} was erased at the migrant's request")


def retired_key_refusal(row: VersionRow) -> Unavailable:
    # Not tampering: the KEK version that wraps this migrant's key was retired before it was
    # re-wrapped (`mhr keys status` counts these). Logged as its own integrity-class event.
    log.error(
        "stored resource is under a retired KEK version",
        extra={
            "event": "kek-retired",
            "resource_type": row.resource_type,
            "resource_id": row.id,
            "version_id": row.version_id,
        },
    )
    return retired_key_outcome()


def retired_key_outcome() -> Unavailable:
    return Unavailable(
        "this record's key is wrapped under a retired key-encryption key; an operator can see "
        "such records with `mhr keys status`",
        code="exception",
    )


def open_version(keys: OpenedKeys, subject: WrappedKey | None, row: VersionRow) -> bytes:
    """The stored canonical JSON of one version; raises IntegrityFailure on any integrity failure,
    Gone for an erased migrant (its key destroyed on purpose), Unavailable under a retired KEK."""
    try:
        if subject is None:
            raise IntegrityError
        cipher = keys.cipher(subject.id, subject.wrapped_key, subject.key_version)
        return cipher.open(
            row.ciphertext, resource_aad(row.resource_type, row.id, row.version_id, row.subject_id)
        )
    except SubjectErased:
        raise erased(row.resource_type) from None
    except KekRetired:
        raise retired_key_refusal(row) from None
    except IntegrityError:
        raise integrity_failure(row) from None

"""The erasure receipt: a C2SP signed note, signed with the audit checkpoint key.

Anyone holding the log's verifier key (``GET /audit/key``, also returned with the receipt)
can check it with ``security.signed_note.NoteVerifier``. Its first line names the format,
so it can never be taken for a checkpoint (whose second line is a tree size). It names
pseudonymous ids only: the migrant's Patient id, the clinic, the two admins' client ids.
"""

from __future__ import annotations

from datetime import datetime

from security.signed_note import NoteSigner
from service.erasure.erase import Destroyed
from service.store.tables import ErasureRequest

RECEIPT_FORMAT = "mhr erasure receipt v1"


def _instant(at: datetime | None) -> str:
    assert at is not None
    return at.isoformat().replace("+00:00", "Z")


def receipt_body(request: ErasureRequest, destroyed: Destroyed, erased_at: datetime) -> str:
    lines = [
        RECEIPT_FORMAT,
        f"request {request.id}",
        f"subject Patient/{request.subject_id}",
        f"clinic Organization/{request.organization_id}",
        f"reason {request.reason}",
        f"requested {_instant(request.requested_at)} client {request.requested_by}",
        f"approved {_instant(request.approved_at)} client {request.approved_by}",
        f"erased {_instant(erased_at)}",
        *destroyed.lines(),
    ]
    return "\n".join(lines) + "\n"


def sign_receipt(signer: NoteSigner, body: str) -> str:
    return signer.sign(body)

"""The follow-up Task's status machine (FHIR Task.status), decided without a database.

An authority moves its task requested -> accepted -> in-progress -> completed | failed; it may
also fail a task from requested or accepted (the migrant never arrived). ``cancelled`` is the
service's alone (consent withdrawn, migrant erased). completed, failed and cancelled are final.
``failed`` needs a businessStatus saying why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

OPEN: Final = frozenset({"requested", "accepted", "in-progress"})
FINAL: Final = frozenset({"completed", "failed", "cancelled"})
AUTHORITY_MOVES: Final[dict[str, frozenset[str]]] = {
    "requested": frozenset({"accepted", "failed"}),
    "accepted": frozenset({"in-progress", "failed"}),
    "in-progress": frozenset({"completed", "failed"}),
}
# Why a task failed (CodeSystem followup-business-status); "consent-withdrawn" is the service's.
FAILURE_REASONS: Final = frozenset({"lost-to-follow-up", "moved", "declined", "deceased"})
WITHDRAWN: Final = "consent-withdrawn"


@dataclass(frozen=True)
class Refusal:
    status: int  # 409: not from this state; 422: a value that is never acceptable
    diagnostics: str


def check_move(current: str, wanted: str, business_status: str | None) -> Refusal | None:
    """None when an authority may move a task from ``current`` to ``wanted``; else why not."""
    if wanted == current:
        return None
    if wanted not in OPEN | FINAL:
        return Refusal(422, f"unknown Task.status '{wanted}'")
    if wanted == "cancelled":
        return Refusal(422, "only the service cancels a follow-up task (consent withdrawn)")
    if wanted not in AUTHORITY_MOVES.get(current, frozenset()):
        return Refusal(409, f"illegal transition from '{current}' to '{wanted}'")
    if wanted == "failed" and business_status not in FAILURE_REASONS:
        allowed = ", ".join(sorted(FAILURE_REASONS))
        return Refusal(422, f"a failed task needs businessStatus, one of: {allowed}")
    return None

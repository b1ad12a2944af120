"""The follow-up rules without a database: the status machine, and which classifications need
follow-up with their due dates."""

from __future__ import annotations

import json
from datetime import date

import pytest
from mhr_testkit import EXAMPLES

from service.tasks.classes import due_date, followup_class
from service.tasks.transitions import AUTHORITY_MOVES, FAILURE_REASONS, FINAL, OPEN, check_move

STATES = sorted(OPEN | FINAL)


@pytest.mark.parametrize("current", STATES)
@pytest.mark.parametrize("wanted", STATES)
def test_every_pair_of_states(current: str, wanted: str) -> None:
    refusal = check_move(current, wanted, "lost-to-follow-up" if wanted == "failed" else None)
    if wanted == current:
        assert refusal is None
    elif wanted == "cancelled":
        assert refusal is not None and refusal.status == 422
    elif wanted in AUTHORITY_MOVES.get(current, frozenset()):
        assert refusal is None
    else:
        assert refusal is not None and refusal.status == 409
        assert f"from '{current}' to '{wanted}'" in refusal.diagnostics


def test_failing_needs_a_known_reason() -> None:
    assert check_move("in-progress", "failed", None) is not None
    assert check_move("in-progress", "failed", "bored") is not None
    for reason in FAILURE_REASONS:
        assert check_move("in-progress", "failed", reason) is None
    assert check_move("requested", "unheard-of", None) is not None


def _classification(name: str) -> dict[str, object]:
    bundle = json.loads(next(p for p in EXAMPLES if p.name == name).read_text())
    return next(
        e["resource"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Observation"
        and "exam-classification" in json.dumps(e["resource"]["code"])
    )


def test_the_example_classifications() -> None:
    assert followup_class(_classification("exam-adult-b1-pulmonary.json")) == "B1-pulmonary"
    assert followup_class(_classification("exam-child-igra-b2.json")) == "B2"
    assert followup_class(_classification("exam-adult-normal.json")) is None
    entered_in_error = {**_classification("exam-adult-b1-pulmonary.json"), "status": "entered-in-error"}
    assert followup_class(entered_in_error) is None
    assert followup_class({"resourceType": "Observation", "code": "nonsense"}) is None


def test_due_dates_per_class_with_a_default() -> None:
    start = date(2026, 1, 31)
    assert due_date("B1-pulmonary", start, {"B1-pulmonary": 14}) == date(2026, 2, 14)
    assert due_date("B3", start, {"B1-pulmonary": 14}) == date(2026, 3, 2)

"""The TB follow-up worksheet: a QuestionnaireResponse checked against its Questionnaire.

Pure: no database. Every item of the answer must be an item of the Questionnaire, answered once
with the item's type (a ``choice`` with one of its answerOptions); required items must be
there; the evaluation cannot precede the arrival nor lie in the future. Diagnostics name the
item (its linkId), never the answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from functools import cache
from pathlib import Path
from typing import Any

import orjson

WORKSHEET_URL = "https://mhr.example.org/fhir/Questionnaire/tb-followup-worksheet"
OUTCOMES = frozenset({"confirmed", "revised"})
_VALUE_KEY = {"date": "valueDate", "boolean": "valueBoolean", "choice": "valueCoding"}


@dataclass(frozen=True)
class Worksheet:
    """What the service keeps in clear from a valid worksheet."""

    arrival_date: date
    evaluated_on: date
    outcome: str
    shared_with_clinic: bool


class WorksheetInvalid(ValueError):
    def __init__(self, diagnostics: str, expression: str) -> None:
        super().__init__(diagnostics)
        self.diagnostics = diagnostics
        self.expression = expression


@cache
def load_questionnaire(ig_dir: Path) -> Mapping[str, Any]:
    found: Mapping[str, Any] = orjson.loads(
        (ig_dir / "Questionnaire-tb-followup-worksheet.json").read_bytes()
    )
    return found


def _answers(response: Mapping[str, Any]) -> dict[str, Any]:
    items = response.get("item")
    if not isinstance(items, list):
        raise WorksheetInvalid("the worksheet has no items", "QuestionnaireResponse.item")
    found: dict[str, Any] = {}
    for index, item in enumerate(items):
        where = f"QuestionnaireResponse.item[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("linkId"), str):
            raise WorksheetInvalid("each item needs a linkId", where)
        link = item["linkId"]
        if link in found:
            raise WorksheetInvalid(f"item '{link}' is answered twice", where)
        answers = item.get("answer")
        if not isinstance(answers, list) or len(answers) != 1 or not isinstance(answers[0], dict):
            raise WorksheetInvalid(f"item '{link}' needs exactly one answer", where)
        found[link] = answers[0]
    return found


def check_worksheet(questionnaire: Mapping[str, Any], response: Mapping[str, Any], today: date) -> Worksheet:
    """The worksheet's facts, or :class:`WorksheetInvalid` naming the first problem."""
    if response.get("questionnaire") != WORKSHEET_URL:
        raise WorksheetInvalid(
            f"questionnaire must be {WORKSHEET_URL}", "QuestionnaireResponse.questionnaire"
        )
    if response.get("status") != "completed":
        raise WorksheetInvalid("a reported worksheet has status completed", "QuestionnaireResponse.status")
    defined = {item["linkId"]: item for item in questionnaire["item"]}
    answers = _answers(response)
    unknown = sorted(set(answers) - set(defined))
    if unknown:
        raise WorksheetInvalid(f"item '{unknown[0]}' is not in the worksheet", "QuestionnaireResponse.item")
    values: dict[str, Any] = {}
    for link, item in defined.items():
        expression = f"QuestionnaireResponse.item.where(linkId='{link}')"
        if link not in answers:
            if item.get("required"):
                raise WorksheetInvalid(f"item '{link}' is required", expression)
            continue
        key = _VALUE_KEY[item["type"]]
        answer = answers[link]
        if set(answer) != {key}:
            raise WorksheetInvalid(f"item '{link}' takes a {item['type']} answer ({key})", expression)
        value = answer[key]
        if item["type"] == "date":
            try:
                value = date.fromisoformat(value) if isinstance(value, str) and len(value) == 10 else None
            except ValueError:
                value = None
            if value is None:
                raise WorksheetInvalid(f"item '{link}' needs a full date (YYYY-MM-DD)", expression)
        elif item["type"] == "boolean":
            if not isinstance(value, bool):
                raise WorksheetInvalid(f"item '{link}' needs true or false", expression)
        else:
            options = {(o["valueCoding"]["system"], o["valueCoding"]["code"]) for o in item["answerOption"]}
            if not isinstance(value, dict) or (value.get("system"), value.get("code")) not in options:
                raise WorksheetInvalid(f"item '{link}' needs one of its answer options", expression)
            value = value["code"]
        values[link] = value
    arrival, evaluated = values["arrival-date"], values["evaluation-date"]
    if evaluated < arrival:
        raise WorksheetInvalid("the evaluation cannot precede the arrival", "QuestionnaireResponse.item")
    if evaluated > today:
        raise WorksheetInvalid("the evaluation date is in the future", "QuestionnaireResponse.item")
    if values.get("treatment-completed") is True and values["treatment-started"] is not True:
        raise WorksheetInvalid("treatment completed but never started", "QuestionnaireResponse.item")
    return Worksheet(
        arrival, evaluated, values["classification-outcome"], values["share-with-examining-clinic"]
    )

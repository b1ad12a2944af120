"""Which exam classifications need follow-up after arrival, and when the follow-up falls due.

A classification Observation (code ``exam-classification``) needs follow-up when its TB
component is one of B0-B3, or its overall class is ``class-b`` / ``class-b-other``. The TB class
decides the due date where present (it is the more specific one); days come from
``settings.followup_due_days``, 30 for a class not named there.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, timedelta
from typing import Any

OBSERVATION_CODE_SYSTEM = "https://mhr.example.org/fhir/CodeSystem/observation-code"
TB_SYSTEM = "https://mhr.example.org/fhir/CodeSystem/tb-classification"
OVERALL_SYSTEM = "https://mhr.example.org/fhir/CodeSystem/overall-classification"
TB_FOLLOWUP = frozenset({"B0", "B1-pulmonary", "B1-extrapulmonary", "B2", "B3"})
OVERALL_FOLLOWUP = frozenset({"class-b", "class-b-other"})
DEFAULT_DUE_DAYS = 30


def _codes(concept: Any, system: str) -> list[str]:
    if not isinstance(concept, dict):
        return []
    codings = concept.get("coding")
    if not isinstance(codings, list):
        return []
    return [
        c["code"]
        for c in codings
        if isinstance(c, dict) and c.get("system") == system and isinstance(c.get("code"), str)
    ]


def followup_class(observation: Mapping[str, Any]) -> str | None:
    """The classification code that makes this Observation need follow-up, or None."""
    if "exam-classification" not in _codes(observation.get("code"), OBSERVATION_CODE_SYSTEM):
        return None
    if observation.get("status") not in ("final", "amended", "corrected"):
        return None
    components = observation.get("component")
    for component in components if isinstance(components, list) else []:
        if not isinstance(component, dict):
            continue
        if "tb-classification" in _codes(component.get("code"), OBSERVATION_CODE_SYSTEM):
            for code in _codes(component.get("valueCodeableConcept"), TB_SYSTEM):
                if code in TB_FOLLOWUP:
                    return code
    for code in _codes(observation.get("valueCodeableConcept"), OVERALL_SYSTEM):
        if code in OVERALL_FOLLOWUP:
            return code
    return None


def due_date(classification: str, start: date, due_days: Mapping[str, int]) -> date:
    """Due ``due_days[classification]`` days (default 30) after ``start`` (arrival, or creation)."""
    return start + timedelta(days=due_days.get(classification, DEFAULT_DUE_DAYS))

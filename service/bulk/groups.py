"""The Groups the service maintains for an authority: "the Class B arrivals assigned to it".

A Group is definitional (``actual: false``): its characteristic is the exam classification
Class B, and its members are the migrants whose current classification Observation *this
authority may see* says Class B. Membership is never stored: it is computed when a Group
export runs, from the Observations the same visibility predicate lets the authority see (an
authority whose consents withhold Observations has no Class B arrivals to learn of). So reading
a Group discloses nothing about anyone, and a Group lists no members.

A Group's id is derived from its authority's id (a digest, so it fits FHIR's 64 characters):
there is no table of Groups, and another authority's Group answers 404 like an absent one.
"""

from __future__ import annotations

import hashlib
from typing import Any

OBSERVATION_CODES = "https://mhr.example.org/fhir/CodeSystem/observation-code"
OVERALL_CLASSIFICATION = "https://mhr.example.org/fhir/CodeSystem/overall-classification"
CLASSIFICATION_CODE = "exam-classification"
CLASS_B = "class-b"


def class_b_group_id(organization_id: str) -> str:
    digest = hashlib.sha256(b"mhr.group.class-b\x00" + organization_id.encode()).hexdigest()
    return f"class-b-{digest[:24]}"


def groups_of(organization_id: str) -> list[dict[str, Any]]:
    """The Groups this authority has, as FHIR Group resources."""
    return [
        {
            "resourceType": "Group",
            "id": class_b_group_id(organization_id),
            "active": True,
            "type": "person",
            "actual": False,
            "name": "Class B arrivals assigned to this authority",
            "managingEntity": {"reference": f"Organization/{organization_id}"},
            "characteristic": [
                {
                    "code": {"coding": [{"system": OBSERVATION_CODES, "code": CLASSIFICATION_CODE}]},
                    "valueCodeableConcept": {"coding": [{"system": OVERALL_CLASSIFICATION, "code": CLASS_B}]},
                    "exclude": False,
                }
            ],
        }
    ]


def group_of(organization_id: str, group_id: str) -> dict[str, Any] | None:
    return next((g for g in groups_of(organization_id) if g["id"] == group_id), None)


def _codes(concept: object, system: str) -> set[str]:
    codings = concept.get("coding") if isinstance(concept, dict) else None
    return {
        str(c.get("code"))
        for c in (codings if isinstance(codings, list) else [])
        if isinstance(c, dict) and c.get("system") == system
    }


def says_class_b(observation: dict[str, Any]) -> bool:
    """Is this (decrypted, visible) Observation a classification that says Class B?"""
    if observation.get("status") in ("entered-in-error", "cancelled"):
        return False
    return CLASSIFICATION_CODE in _codes(observation.get("code"), OBSERVATION_CODES) and CLASS_B in _codes(
        observation.get("valueCodeableConcept"), OVERALL_CLASSIFICATION
    )

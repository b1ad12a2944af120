"""An audit entry as a FHIR R4 `AuditEvent` (IHE BALP shape), built from its canonical content.

Built from the hashed content bytes, never from the search columns, so that
what an auditor reads is what the Merkle log proves.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson

DCM = "http://dicom.nema.org/resources/ontology/DCM"
AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL_INTERACTION = "http://hl7.org/fhir/restful-interaction"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
SECURITY_ROLE_TYPE = "http://terminology.hl7.org/CodeSystem/extra-security-role-type"
BALP_ENTITY_TYPE = "http://hl7.org/fhir/uv/ihe-basic-audit/CodeSystem/BasicAuditEntityType"

MHR = "https://mhr.example.org/fhir"
SUBTYPE_SYSTEM = f"{MHR}/CodeSystem/audit-subtype"
ROLE_SYSTEM = f"{MHR}/CodeSystem/client-role"
CLIENT_SID = f"{MHR}/sid/client"
PERSON_SID = f"{MHR}/sid/person"
INSTANCE_SID = f"{MHR}/sid/service-instance"
DETAIL_SYSTEM = f"{MHR}/CodeSystem/audit-detail"
LEAF_INDEX_EXT = f"{MHR}/StructureDefinition/audit-leaf-index"
AGGREGATE_EXT = f"{MHR}/StructureDefinition/audit-aggregate"
RESTFUL_CODES = frozenset(
    {
        "read",
        "vread",
        "update",
        "patch",
        "delete",
        "history",
        "history-instance",
        "history-type",
        "history-system",
        "create",
        "search",
        "search-type",
        "search-system",
        "capabilities",
        "transaction",
        "batch",
        "operation",
    }
)

# Event type -> AuditEvent.type. Disclosures follow BALP's PrivacyDisclosure (DICOM "Export").
EVENT_TYPES: dict[str, dict[str, str]] = {
    "rest": {"system": AUDIT_EVENT_TYPE, "code": "rest", "display": "RESTful Operation"},
    "disclosure": {"system": DCM, "code": "110106", "display": "Export"},
    "export": {"system": DCM, "code": "110106", "display": "Export"},
    "login": {"system": DCM, "code": "110114", "display": "User Authentication"},
    "admin": {"system": DCM, "code": "110113", "display": "Security Alert"},
}
_EXTRA_SUBTYPES: dict[str, dict[str, str]] = {
    "login": {"system": DCM, "code": "110122", "display": "Login"},
    "admin": {"system": DCM, "code": "110137", "display": "User Security Attributes Changed"},
}

# `type` search: the FHIR codes (with or without system) and the internal names.
TYPE_SEARCH: dict[str, tuple[str, ...]] = {
    "rest": ("rest",),
    "disclosure": ("disclosure",),
    "export": ("export",),
    "login": ("login",),
    "admin": ("admin",),
    "110106": ("disclosure", "export"),
    "110114": ("login",),
    "110113": ("admin",),
}


def _coding(system: str, code: str, display: str | None = None) -> dict[str, str]:
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return coding


def _purpose(code: str) -> list[dict[str, Any]]:
    return [{"coding": [_coding(ACT_REASON, code)]}]


def audit_event(entry_id: int, content: bytes, leaf_index: int | None) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(content)
    kind = data["type"]
    subtype = data["subtype"]
    subtypes = [
        _coding(RESTFUL_INTERACTION if subtype in RESTFUL_CODES else SUBTYPE_SYSTEM, subtype),
    ]
    if kind in _EXTRA_SUBTYPES:
        subtypes.append(_EXTRA_SUBTYPES[kind])
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(entry_id),
        "type": EVENT_TYPES.get(kind, _coding(SUBTYPE_SYSTEM, kind)),
        "subtype": subtypes,
        "action": data["action"],
        "recorded": data["recorded"],
        "outcome": data["outcome"],
    }
    extensions: list[dict[str, Any]] = []
    if leaf_index is not None:
        extensions.append({"url": LEAF_INDEX_EXT, "valueInteger": leaf_index})
    aggregate = data.get("aggregate")
    if aggregate:
        # One entry for many like refusals: how many, and the period they fell in.
        extensions.append(
            {
                "url": AGGREGATE_EXT,
                "extension": [
                    {"url": "count", "valueInteger": aggregate["count"]},
                    {"url": "period", "valuePeriod": {"start": aggregate["first"], "end": aggregate["last"]}},
                ],
            }
        )
    if extensions:
        event["extension"] = extensions
    if "detail" in data:
        event["outcomeDesc"] = data["detail"]
    purpose = data.get("purpose")
    if purpose:
        event["purposeOfEvent"] = _purpose(purpose)

    agent = data.get("agent", {})
    agents: list[dict[str, Any]] = []
    client: dict[str, Any] = {
        "type": {"coding": [_coding(DCM, "110150", "Application")]},
        "who": {"identifier": {"system": CLIENT_SID, "value": agent.get("client", "unknown")}},
        "requestor": True,
    }
    if "role" in agent:
        client["role"] = [{"coding": [_coding(ROLE_SYSTEM, agent["role"])]}]
    if purpose:
        client["purposeOfUse"] = _purpose(purpose)
    if "address" in agent:
        client["network"] = {"address": agent["address"], "type": "2"}  # 2 = IP address
    agents.append(client)
    if "organization" in agent:
        agents.append(
            {
                "type": {"coding": [_coding(DCM, "110153", "Source Role ID")]},
                "who": {"reference": f"Organization/{agent['organization']}"},
                "requestor": False,
            }
        )
    if "person" in agent:
        # The asserted person behind the client: a pseudonymous identifier, no name.
        agents.append(
            {
                "type": {"coding": [_coding(SECURITY_ROLE_TYPE, "humanuser", "human user")]},
                "who": {"identifier": {"system": PERSON_SID, "value": agent["person"]}},
                "requestor": True,
            }
        )
    for recipient in data.get("recipients", ()):
        agents.append(
            {
                "type": {"coding": [_coding(DCM, "110152", "Destination Role ID")]},
                "who": {"reference": f"Organization/{recipient}"},
                "requestor": False,
            }
        )
    event["agent"] = agents
    event["source"] = {
        "observer": {"identifier": {"system": INSTANCE_SID, "value": data["source"]}},
        "type": [_coding(SOURCE_TYPE, "4", "Application Server")],
    }

    entities: list[dict[str, Any]] = [
        {
            "what": {"identifier": {"value": data["request"]}},
            "type": _coding(BALP_ENTITY_TYPE, "XrequestId", "X-Request-Id"),
        }
    ]
    for patient in data.get("patients", ()):
        entities.append(
            {
                "what": {"reference": f"Patient/{patient}"},
                "type": _coding(ENTITY_TYPE, "1", "Person"),
                "role": _coding(OBJECT_ROLE, "1", "Patient"),
            }
        )
    for item in data.get("entities", ()):
        reference = f"{item['type']}/{item['id']}"
        if "version" in item:
            reference += f"/_history/{item['version']}"
        entity: dict[str, Any] = {
            "what": {"reference": reference},
            "type": _coding(ENTITY_TYPE, "2", "System Object"),
        }
        if "sha256" in item:
            entity["detail"] = [{"type": "ciphertext-sha256", "valueString": item["sha256"]}]
        entities.append(entity)
    if "query" in data:
        entities.append(
            {
                "type": _coding(ENTITY_TYPE, "2", "System Object"),
                "role": _coding(OBJECT_ROLE, "24", "Query"),
                "query": base64.b64encode(data["query"].encode()).decode("ascii"),
            }
        )
    decision = data.get("decision")
    if decision:
        consent: dict[str, Any] = {"type": _coding(ENTITY_TYPE, "2", "System Object")}
        if "consent" in decision:
            reference = decision["consent"]
            if "/" not in reference:
                reference = f"Consent/{reference}"
            if "consentVersion" in decision:
                reference += f"/_history/{decision['consentVersion']}"
            consent["what"] = {"reference": reference}
        if "rule" in decision:
            consent["detail"] = [{"type": "decision-rule", "valueString": decision["rule"]}]
        entities.append(consent)
    event["entity"] = entities
    return event

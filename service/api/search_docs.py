"""The OpenAPI document's searches: one operation per searchable type, with its parameters.

The records router serves every type's search through one route (``GET /fhir/{resource_type}``)
that reads its parameters itself, so FastAPI alone documents none of them. Here each type also
gets its own ``GET /fhir/{Type}`` and ``POST /fhir/{Type}/_search`` listing the parameters that the
router accepts for it (service.records.search_params), typed and explained as the
CapabilityStatement declares them; routes of their own (Organization, AuditEvent) get the
CapabilityStatement's parameters that they do not declare themselves.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

GENERIC_SEARCH = "/fhir/{resource_type}"
GENERIC_POST_SEARCH = "/fhir/{resource_type}/_search"

_BY_TYPE = {
    "token": "[system|]code; several values, comma-separated, match any.",
    "date": (
        "A FHIR date or dateTime with an optional prefix eq, ge, gt, le or lt (ge2024-01-01); "
        "repeat the parameter for a range."
    ),
    "reference": "The id, or Type/id.",
    "string": "Matched as text.",
    "number": "An integer.",
}
_NOTES = {
    "identifier": (
        "system|value. Prefer POST _search: an identifier in a URL can end up in logs and browser history."
    ),
    "_id": "Resource ids, comma-separated.",
    "_lastUpdated": "When the version was stored: " + _BY_TYPE["date"],
    "value-concept": "system|code of a coded result, matched within what the caller may see.",
}
_FALLBACK_TYPES = {"_id": "token", "_lastUpdated": "date", "patient": "reference", "date": "date"}


def _describe(name: str, fhir_type: str, documentation: str | None) -> str:
    text = _NOTES.get(name) or _BY_TYPE.get(fhir_type, "")
    return f"{documentation} {text}".strip() if documentation else text


def _parameter(name: str, declared: Mapping[str, Any]) -> dict[str, Any]:
    fhir_type = str(declared.get("type") or _FALLBACK_TYPES.get(name, "string"))
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": {"type": "integer" if fhir_type == "number" else "string"},
        "description": _describe(name, fhir_type, declared.get("documentation")),
    }


def document_searches(
    schema: dict[str, Any],
    capability: Mapping[str, Any],
    type_parameters: Mapping[str, Iterable[str]],
    control_parameters: Iterable[str],
) -> None:
    paths: dict[str, Any] = schema.setdefault("paths", {})
    rest: Mapping[str, Any] = next(iter(capability.get("rest", [])), {})
    declared_by_type = {
        resource["type"]: {p["name"]: p for p in resource.get("searchParam", [])}
        for resource in rest.get("resource", [])
    }
    rest_level = {p["name"]: p for p in rest.get("searchParam", [])}
    controls = [_parameter(name, rest_level.get(name, {})) for name in sorted(control_parameters)]

    # The generic operations stay (they are what the router serves, for any type), with the
    # parameters every type shares; each type's own operation lists the rest.
    generic_get = paths.get(GENERIC_SEARCH, {}).get("get")
    generic_post = paths.get(GENERIC_POST_SEARCH, {}).get("post")
    if generic_get is not None:
        generic_get["parameters"] = [*generic_get.get("parameters", []), *controls]
        generic_get["description"] = "The parameters of each type are listed under GET /fhir/{Type}."
    if generic_post is not None:
        generic_post["description"] = (
            "The parameters of each type are listed under POST /fhir/{Type}/_search."
        )
    for resource_type in sorted(type_parameters):
        declared = declared_by_type.get(resource_type, {})
        own = [_parameter(name, declared.get(name, {})) for name in sorted(type_parameters[resource_type])]
        if generic_get is not None:
            get = copy.deepcopy(generic_get)
            get["summary"] = f"search {resource_type}"
            get["operationId"] = f"search_{resource_type}"
            get["parameters"] = own + controls
            get.pop("description", None)
            paths.setdefault(f"/fhir/{resource_type}", {})["get"] = get
        if generic_post is not None:
            post = copy.deepcopy(generic_post)
            post["summary"] = f"search {resource_type} (form body)"
            post["operationId"] = f"search_{resource_type}_post"
            post["parameters"] = []
            post.pop("description", None)
            fields = {p["name"]: {**p["schema"], "description": p["description"]} for p in own + controls}
            post["requestBody"] = {
                "required": True,
                "content": {
                    "application/x-www-form-urlencoded": {"schema": {"type": "object", "properties": fields}}
                },
            }
            paths[f"/fhir/{resource_type}/_search"] = {"post": post}

    for resource_type, declared in declared_by_type.items():
        operation = paths.get(f"/fhir/{resource_type}", {}).get("get")
        if operation is None or resource_type in type_parameters:
            continue
        present = {p["name"] for p in operation.get("parameters", [])}
        operation.setdefault("parameters", []).extend(
            _parameter(name, spec) for name, spec in declared.items() if name not in present
        )

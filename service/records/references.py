"""Finding and rewriting references inside a resource (``urn:uuid`` -> server ids)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from service.records.resource_types import SUBJECT_ELEMENT

_RELATIVE = re.compile(r"^(?P<type>[A-Z][A-Za-z]{1,63})/(?P<id>[A-Za-z0-9\-.]{1,64})(/_history/\d+)?$")


def parse_relative(reference: str) -> tuple[str, str] | None:
    match = _RELATIVE.match(reference)
    return (match["type"], match["id"]) if match else None


def iter_references(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every ``reference`` string in a resource with its FHIRPath-ish location."""
    if isinstance(node, dict):
        for key, value in node.items():
            child = f"{path}.{key}" if path else key
            if key == "reference" and isinstance(value, str):
                yield child, value
            elif key != "contained":  # contained resources resolve by '#id' locally
                yield from iter_references(value, child)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from iter_references(item, f"{path}[{index}]")


def rewrite_references(node: Any, replace: Callable[[str], str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                node[key] = replace(value)
            elif key != "contained":
                rewrite_references(value, replace)
    elif isinstance(node, list):
        for item in node:
            rewrite_references(item, replace)


def subject_reference(resource: dict[str, Any]) -> str | None:
    element = SUBJECT_ELEMENT.get(resource.get("resourceType", ""))
    if element is None:
        return None
    value = resource.get(element)
    if isinstance(value, dict) and isinstance(value.get("reference"), str):
        return str(value["reference"])
    return None

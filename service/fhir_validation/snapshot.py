"""Snapshots of the guide's StructureDefinitions: the base definition's snapshot with the
differential laid over it, as standard FHIR tools (validators, IG tooling) expect to find.

The profiles here constrain elements without slicing (the validator refuses slicing), so a
differential element matches exactly one snapshot element by path. A path below a complex
datatype (``Patient.identifier.system``) first unrolls that datatype's elements under its
parent, as the FHIR snapshot algorithm does. Differential keys replace the base's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

JSONObject = dict[str, Any]
TypeSnapshot = Callable[[str], list[JSONObject]]


class SnapshotError(ValueError):
    """A differential cannot be laid over its base."""


def _unroll(elements: list[JSONObject], parent_path: str, type_snapshot: TypeSnapshot) -> None:
    index = next((i for i, e in enumerate(elements) if e["path"] == parent_path), None)
    if index is None:
        _unroll(elements, parent_path.rsplit(".", 1)[0], type_snapshot)
        index = next((i for i, e in enumerate(elements) if e["path"] == parent_path), None)
        if index is None:
            raise SnapshotError(f"{parent_path} is not an element of its base")
    parent = elements[index]
    types = [t["code"] for t in parent.get("type", [])]
    if len(types) != 1 or not types[0][:1].isupper():
        raise SnapshotError(f"{parent_path} is not of one complex datatype; it cannot be unrolled")
    children = []
    for child in type_snapshot(types[0])[1:]:
        rest = child["path"].split(".", 1)[1]
        unrolled = copy.deepcopy(child)
        unrolled["id"] = f"{parent['id']}.{rest}"
        unrolled["path"] = f"{parent_path}.{rest}"
        children.append(unrolled)
    elements[index + 1 : index + 1] = children


def generate(
    base: list[JSONObject], differential: list[JSONObject], type_snapshot: TypeSnapshot
) -> list[JSONObject]:
    """The snapshot elements of a profile over ``base`` (a snapshot element list)."""
    elements = copy.deepcopy(base)
    for constraint in differential:
        path = constraint["path"]
        if not any(e["path"] == path for e in elements):
            if "." not in path:
                raise SnapshotError(f"{path} is not an element of its base")
            parent = path.rsplit(".", 1)[0]
            if any(e["path"].startswith(parent + ".") for e in elements):
                raise SnapshotError(f"{path} is not an element of its base")
            _unroll(elements, parent, type_snapshot)
        element = next(e for e in elements if e["path"] == path)
        for key, value in constraint.items():
            if key not in ("id", "path"):
                element[key] = copy.deepcopy(value)
    return elements


def with_snapshot(definition: JSONObject, elements: list[JSONObject]) -> JSONObject:
    """``definition`` with its snapshot set, placed before the differential as HL7's files do."""
    out: JSONObject = {}
    for key, value in definition.items():
        if key == "snapshot":
            continue
        if key == "differential":
            out["snapshot"] = {"element": elements}
        out[key] = value
    return out

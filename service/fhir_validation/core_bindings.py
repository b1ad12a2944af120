"""Required bindings of the FHIR R4 base specification, enforced on every write.

The profiles of the guide bind only the elements they constrain; the base specification binds
many more with strength ``required`` (``Patient.gender``, ``Observation.status``,
``Encounter.status``, ``Identifier.use`` inside any Identifier, ...). Their expansions are
derived at build time from the official R4 definitions (:func:`derive`, run by
``python -m service.fhir_validation.build``) into ``core_required_bindings.json`` beside this
module: per resource type, the JSON key paths of every element with a required binding (through
datatypes and backbone elements, choice types resolved to their JSON names) and the codes.

At run time (:class:`CoreBindings`) the paths form a trie per resource type, so checking a
resource costs a walk over the keys it actually has. Each violation is one issue whose
expression is the element's FHIRPath; diagnostics name the value set, never the value sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson

from service.fhir_validation.core import CoreDefinitions, NotEnumerable, canonical
from service.fhir_validation.issue import Issue

JSONObject = dict[str, Any]
DATA_FILE: Final = Path(__file__).with_name("core_required_bindings.json")

# Datatypes whose elements can carry a required binding and that a binding check reads.
_BINDABLE: Final = frozenset({"code", "Coding", "CodeableConcept", "string", "uri", "canonical"})
# Not walked into: extensions are open by design, contained and Bundle entry resources are
# validated as resources of their own, and Element/BackboneElement children come from the
# snapshot of the type that holds them.
_NOT_WALKED: Final = frozenset({"Extension", "Resource", "Element", "BackboneElement"})


# --------------------------------------------------------------------------- build time


def _walk(
    core: CoreDefinitions,
    elements: list[JSONObject],
    keys: tuple[str, ...],
    fhir_path: str,
    chain: frozenset[str],
    out: list[JSONObject],
    skipped: dict[str, str],
) -> None:
    paths = [e["path"] for e in elements]
    for element in elements[1:]:
        segments = element["path"].split(".")[1:]
        if any(s in ("extension", "modifierExtension") for s in segments) or "contentReference" in element:
            continue
        last = segments[-1]
        has_children = any(p.startswith(element["path"] + ".") for p in paths)
        binding = element.get("binding") or {}
        required = binding.get("strength") == "required" and isinstance(binding.get("valueSet"), str)
        for type_ref in element.get("type", []):
            code = str(type_ref.get("code", ""))
            key = last[:-3] + code[:1].upper() + code[1:] if last.endswith("[x]") else last
            json_keys = (*keys, *segments[:-1], key)
            path = ".".join((fhir_path, *segments[:-1], key))
            if required and code in _BINDABLE:
                url = canonical(binding["valueSet"])
                try:
                    core.expand(url)
                except NotEnumerable as exc:
                    skipped[url] = str(exc)
                else:
                    out.append({"path": path, "keys": list(json_keys), "type": code, "valueSet": url})
            if code[:1].isupper() and code not in _NOT_WALKED and code not in chain and not has_children:
                nested = core.type_definition(code)["snapshot"]["element"]
                _walk(core, nested, json_keys, path, chain | {code}, out, skipped)


def derive(core: CoreDefinitions, resource_types: list[str]) -> JSONObject:
    """The data file's content for these resource types (deterministic: sorted throughout)."""
    bindings: dict[str, list[JSONObject]] = {}
    skipped: dict[str, str] = {}
    for resource_type in sorted(set(resource_types)):
        out: list[JSONObject] = []
        elements = core.type_definition(resource_type)["snapshot"]["element"]
        _walk(core, elements, (), resource_type, frozenset({resource_type}), out, skipped)
        bindings[resource_type] = sorted(out, key=lambda b: b["path"])
    urls = sorted({b["valueSet"] for found in bindings.values() for b in found})
    value_sets = {url: sorted([s, c] for s, c in core.expand(url)) for url in urls}
    return {
        "description": (
            "Required bindings of the FHIR R4 base specification for the resource types the "
            "server serves, derived from the official R4 definitions by "
            "`python -m service.fhir_validation.build`. Do not edit by hand."
        ),
        "fhirVersion": core.version,
        "bindings": bindings,
        "valueSets": value_sets,
        "notEnforced": dict(sorted(skipped.items())),
    }


# --------------------------------------------------------------------------- run time


@dataclass(frozen=True)
class _Binding:
    path: str
    type: str
    value_set: str
    codes: frozenset[str]
    pairs: frozenset[tuple[str, str]]


@dataclass
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)
    bindings: list[_Binding] = field(default_factory=list)


def _violation(binding: _Binding, value: Any, expr: str) -> Issue | None:
    where = f"{binding.path} has a required binding to {binding.value_set} (FHIR R4)"
    if isinstance(value, str):
        if binding.type in ("Coding", "CodeableConcept") or value in binding.codes:
            return None  # a string where a Coding is due is the structural layer's finding
        return Issue("error", "code-invalid", expr, f"{where}; the code is not in that value set", basic=True)
    if not isinstance(value, dict):
        return None
    if binding.type == "Coding":
        if "code" not in value or (value.get("system"), value.get("code")) in binding.pairs:
            return None
        return Issue("error", "code-invalid", f"{expr}.code", f"{where}; the coding is not in it", basic=True)
    if binding.type == "CodeableConcept":
        codings = value.get("coding")
        codings = codings if isinstance(codings, list) else []
        if any(isinstance(c, dict) and (c.get("system"), c.get("code")) in binding.pairs for c in codings):
            return None
        target = f"{expr}.coding[0].code" if len(codings) == 1 else expr
        return Issue("error", "code-invalid", target, f"{where}; no coding is in it", basic=True)
    return None


def _check(node: _Node, value: Any, expr: str, out: list[Issue]) -> None:
    if not isinstance(value, dict):
        return
    for key, child in node.children.items():
        found = value.get(key)
        if found is None:
            continue
        items = enumerate(found) if isinstance(found, list) else ((None, found),)
        for index, item in items:
            where = f"{expr}.{key}" if index is None else f"{expr}.{key}[{index}]"
            for binding in child.bindings:
                issue = _violation(binding, item, where)
                if issue is not None:
                    out.append(issue)
            if child.children:
                _check(child, item, where, out)


class CoreBindings:
    """Checks the base specification's required bindings; read-only, thread-safe."""

    def __init__(self, data: JSONObject) -> None:
        pairs = {url: frozenset((s, c) for s, c in members) for url, members in data["valueSets"].items()}
        self.version: str = data["fhirVersion"]
        self._roots: dict[str, _Node] = {}
        for resource_type, found in data["bindings"].items():
            root = self._roots.setdefault(resource_type, _Node())
            for spec in found:
                node = root
                for key in spec["keys"]:
                    node = node.children.setdefault(key, _Node())
                members = pairs[spec["valueSet"]]
                node.bindings.append(
                    _Binding(
                        path=spec["path"],
                        type=spec["type"],
                        value_set=spec["valueSet"],
                        codes=frozenset(c for _, c in members),
                        pairs=members,
                    )
                )

    @classmethod
    def load(cls, path: Path = DATA_FILE) -> CoreBindings:
        return cls(orjson.loads(path.read_bytes()))

    @property
    def resource_types(self) -> list[str]:
        return sorted(self._roots)

    def issues(self, resource: Any, root_expr: str) -> list[Issue]:
        if not isinstance(resource, dict):
            return []
        root = self._roots.get(str(resource.get("resourceType")))
        if root is None:
            return []
        out: list[Issue] = []
        _check(root, resource, root_expr, out)
        return out

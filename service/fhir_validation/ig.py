"""The implementation guide in ``fhir/``: loaded once, indexed by canonical URL and by type.

Only JSON files that are FHIR resources (they carry ``resourceType``) are indexed; other JSON
documents are skipped (the folder should hold none: FHIR tools load every file in it).
ValueSets are expanded here from ``compose`` (explicit concepts, whole local CodeSystems, and
other local ValueSets); anything that would need a terminology server is refused at load time
rather than silently accepted at validation time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

JSONObject = dict[str, Any]
Code = tuple[str, str]  # (system, code)


class IGError(ValueError):
    """The implementation guide is inconsistent or uses a feature this loader does not support."""


def _concepts(concepts: list[JSONObject]) -> Iterator[str]:
    for concept in concepts:
        yield concept["code"]
        yield from _concepts(concept.get("concept", []))


@dataclass
class ImplementationGuide:
    """All FHIR resources of the guide; read-only after :meth:`load`."""

    root: Path
    by_url: dict[str, JSONObject] = field(default_factory=dict)
    by_type: dict[str, list[JSONObject]] = field(default_factory=dict)
    _expansions: dict[str, frozenset[Code]] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, root: Path) -> ImplementationGuide:
        ig = cls(root=root)
        for path in sorted(root.rglob("*.json")):
            try:
                data = orjson.loads(path.read_bytes())
            except orjson.JSONDecodeError as exc:
                raise IGError(f"{path.relative_to(root)} is not valid JSON") from exc
            if not isinstance(data, dict) or "resourceType" not in data:
                continue  # not a FHIR resource (e.g. the security label rules)
            ig.by_type.setdefault(data["resourceType"], []).append(data)
            url = data.get("url")
            if isinstance(url, str) and data["resourceType"] != "Bundle":
                if url in ig.by_url:
                    raise IGError(f"duplicate canonical URL {url}")
                ig.by_url[url] = data
        for value_set in ig.by_type.get("ValueSet", []):
            ig.expand(value_set["url"])
        return ig

    def resource(self, url: str, resource_type: str | None = None) -> JSONObject:
        """The resource with this canonical URL (a ``|version`` suffix is ignored)."""
        res = self.by_url.get(url.split("|", 1)[0])
        if res is None or (resource_type is not None and res["resourceType"] != resource_type):
            raise IGError(f"no {resource_type or 'resource'} with URL {url} in the guide")
        return res

    def resources(self, resource_type: str) -> list[JSONObject]:
        return list(self.by_type.get(resource_type, []))

    def code_system_codes(self, url: str) -> frozenset[str]:
        code_system = self.resource(url, "CodeSystem")
        if code_system.get("content") != "complete":
            raise IGError(f"CodeSystem {url} is not complete; it cannot be enumerated")
        return frozenset(_concepts(code_system.get("concept", [])))

    def expand(self, url: str) -> frozenset[Code]:
        """Every (system, code) of a local ValueSet."""
        key = url.split("|", 1)[0]
        cached = self._expansions.get(key)
        if cached is not None:
            return cached
        value_set = self.resource(key, "ValueSet")
        self._expansions[key] = frozenset()  # cycle guard
        if "compose" in value_set:
            compose: Mapping[str, Any] = value_set["compose"]
            codes = self._include(compose.get("include", []), url)
            codes -= self._include(compose.get("exclude", []), url)
        elif "expansion" in value_set:
            codes = {(c["system"], c["code"]) for c in value_set["expansion"].get("contains", [])}
        else:
            raise IGError(f"ValueSet {url} has neither compose nor expansion")
        result = frozenset(codes)
        self._expansions[key] = result
        return result

    def _include(self, parts: list[JSONObject], url: str) -> set[Code]:
        codes: set[Code] = set()
        for part in parts:
            if "filter" in part:
                raise IGError(f"ValueSet {url}: filters need a terminology server")
            selected: set[Code] | None = None
            system = part.get("system")
            if system is not None:
                if "concept" in part:
                    selected = {(system, c["code"]) for c in part["concept"]}
                else:
                    selected = {(system, c) for c in self.code_system_codes(system)}
            for other in part.get("valueSet", []):
                members = set(self.expand(other))
                selected = members if selected is None else selected & members
            if selected is None:
                raise IGError(f"ValueSet {url}: an include has neither system nor valueSet")
            codes |= selected
        return codes

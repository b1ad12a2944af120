"""Consent on the way out: a disclosed resource never names a resource the caller may not see.

A Provenance that lists the HIV Observation an authority gets 404 for, or a
DiagnosticReport whose ``result`` names it, would reveal the diagnosis without
disclosing it. So every reference in a disclosed resource to a stored resource
(``Type/id``, or ``Type/id/_history/n``) is checked with the same visibility
predicate that filters reads, for the whole page in one statement, and a
reference the caller may not follow is **dropped**: removed from its list, or
the element removed. When what remains would be meaningless, the enclosing
element goes too (an ``Encounter.diagnosis`` without its ``condition``, an
extension without its value); a modifier extension that has to go takes the
element it modifies with it. Only where the resource itself requires the
element (``Provenance.target``, 1..*) is a reference replaced by a masked one
(no ``reference``, no ``display``; the DataAbsentReason extension ``masked``).
See SECURITY.md for why dropping, not masking, is the default.

A reference to the disclosed resource's own migrant (``Patient/<subject>``) is
left alone: the disclosure is of that migrant's record, and the pseudonymous
id is what the consent is about. References inside contained resources and
extensions are checked like any other.

Cheap by construction: reads answer from the stored canonical bytes, whose
references are found by a scan of the bytes (:func:`references_in`: every
``"reference"`` member with a string value, at any depth, as the tree walk finds
them), so only a resource that names a withheld resource is parsed and
re-serialised, and the visibility of a page's references is one SQL query.
Clinics see their own submissions unmasked.
"""

from __future__ import annotations

import asyncio
import re
import types
import typing
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any, Final

import orjson

from service.records.grant_predicate import Audience
from service.records.repository import RecordRepository, VersionRow
from service.records.resource_types import STORED_TYPES

DATA_ABSENT_REASON: Final = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
MASKED_REFERENCE: Final[dict[str, Any]] = {"extension": [{"url": DATA_ABSENT_REASON, "valueCode": "masked"}]}
_REFERENCE_KEY: Final = b'"reference"'
# A ``"reference"`` member with a string value, in JSON bytes: the name, then the JSON string up
# to its first unescaped quote (the unrolled form, which the regex engine runs without
# backtracking). The literal start lets the engine search for it as a substring. A match is a
# member name only when the byte before it (past whitespace) is ``{`` or ``,``: inside a JSON
# string every quote is escaped (``\\"``), so text within a string never passes that check.
_REFERENCE_MEMBER: Final = re.compile(rb'"reference"\s*:\s*"([^"\\]*(?:\\.[^"\\]*)*)"')
_WHITESPACE: Final = b" \t\n\r"
_ESCAPE: Final = b"\\"
_ITEMS_BETWEEN_YIELDS: Final = 128
_TARGET = re.compile(
    r"^(?P<type>[A-Z][A-Za-z]{1,63})/(?P<id>[A-Za-z0-9\-.]{1,64})(/_history/(?P<version>\d{1,9}))?$"
)
_MAX_DEPTH: Final = 8  # element nesting followed when deriving required elements (Consent.provision recurses)

Target = tuple[str, str, int | None]  # type, id, version (None: the current one)


class _Drop:
    """Marks an element that has to go (its reference may not be followed)."""


DROP: Final = _Drop()


@cache
def required_elements(resource_type: str) -> frozenset[str]:
    """Dotted paths (``Provenance.target``, ``Encounter.diagnosis.condition``) of the elements on
    the way to a reference that the base resource requires (min >= 1), from the R4B models,
    computed once per type."""
    from fhir.resources.R4B import get_fhir_model_class
    from fhir.resources.R4B.backboneelement import BackboneElement
    from fhir.resources.R4B.reference import Reference

    found: set[str] = set()

    def element_class(annotation: Any) -> Any:
        while typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = args[0]
        klass = getattr(annotation, "get_model_klass", None)
        return klass() if klass is not None else None

    def walk(model: Any, path: str, depth: int) -> None:
        for name, field in model.model_fields.items():
            key = field.alias or name
            if key.startswith("_") or key in ("extension", "modifierExtension", "contained"):
                continue
            klass = element_class(field.annotation)
            if klass is None:
                continue
            here = f"{path}.{key}"
            if issubclass(klass, Reference):
                if field.is_required():
                    found.add(here)
            elif issubclass(klass, BackboneElement) and depth < _MAX_DEPTH:
                if field.is_required():
                    found.add(here)
                walk(klass, here, depth + 1)

    try:
        model = get_fhir_model_class(resource_type)
    except ValueError:  # not a FHIR resource type: nothing is required
        return frozenset()
    walk(model, resource_type, 0)
    return frozenset(found)


def parse_target(reference: str, base_url: str) -> Target | None:
    """The stored resource a reference names, or None (a logical, contained or foreign reference)."""
    if reference.startswith(base_url):
        reference = reference[len(base_url) :]
    match = _TARGET.match(reference)
    if match is None or match["type"] not in STORED_TYPES:
        return None
    version = match["version"]
    return match["type"], match["id"], int(version) if version else None


class ReferenceMask:
    """Drops references to what ``audience`` may not see, from the bytes about to be disclosed."""

    def __init__(self, repo: RecordRepository, audience: Audience, fhir_base_url: str) -> None:
        self.repo = repo
        self.audience = audience
        self.base = fhir_base_url.rstrip("/") + "/"

    async def apply(self, items: Sequence[tuple[VersionRow, bytes]]) -> list[bytes]:
        """The bodies to send, in order: unchanged bytes unless they name something withheld."""
        bodies = [body for _, body in items]
        if self.audience.grant is None:  # a clinic sees its own submissions as written
            return bodies
        named: dict[int, set[Target]] = {}
        for index, (row, body) in enumerate(items):
            if index % _ITEMS_BETWEEN_YIELDS == _ITEMS_BETWEEN_YIELDS - 1:
                await asyncio.sleep(0)  # an export's batch is thousands: let requests through
            if _REFERENCE_KEY not in body:
                continue
            targets = self._targets(references_in(body), row)
            if targets:
                named[index] = targets
        if not named:
            return bodies
        wanted = set().union(*named.values())
        allowed = await self.repo.visible_references(wanted, self.audience)
        for index, targets in named.items():
            if targets <= allowed:
                continue  # the common case: the bytes go out as stored, never parsed
            own = items[index][0].subject_id

            def withheld(reference: str, own: str = own) -> bool:
                target = parse_target(reference, self.base)
                return target is not None and not _own_subject(target, own) and target not in allowed

            bodies[index] = orjson.dumps(drop_references(orjson.loads(bodies[index]), withheld))
        return bodies

    def _targets(self, references: typing.Iterable[str], row: VersionRow) -> set[Target]:
        targets: set[Target] = set()
        for reference in references:
            target = parse_target(reference, self.base)
            if target is not None and not _own_subject(target, row.subject_id):
                targets.add(target)
        return targets


def references_in(body: bytes) -> list[str]:
    """Every ``reference`` string in a resource's JSON bytes, as :func:`_references` finds them in
    the parsed resource (contained resources and extensions included), without parsing it.

    A body with a ``\\u`` escape anywhere (a member name could be spelt with one) is parsed and
    walked instead, so that no spelling of ``"reference"`` is missed."""
    if b"\\u" in body:
        return list(_references(orjson.loads(body)))
    found: list[str] = []
    for match in _REFERENCE_MEMBER.finditer(body):
        before = match.start() - 1
        while before >= 0 and body[before] in _WHITESPACE:
            before -= 1
        if before < 0 or body[before] not in b"{,":
            continue  # not a member name: the end of a string that ends in it
        value = match.group(1)
        found.append(orjson.loads(b'"' + value + b'"') if _ESCAPE in value else value.decode())
    return found


def _own_subject(target: Target, subject_id: str) -> bool:
    return target[0] == "Patient" and target[1] == subject_id


def _references(node: Any) -> typing.Iterator[str]:
    """Every ``reference`` string, contained resources and extensions included."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            else:
                yield from _references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _references(item)


def drop_references(resource: dict[str, Any], withheld: Callable[[str], bool]) -> dict[str, Any]:
    """``resource`` without the references ``withheld`` says may not be followed (changed in place)."""
    rtype = str(resource.get("resourceType", ""))
    required = required_elements(rtype)
    for key in list(resource):
        if key in ("resourceType", "id", "meta"):
            continue
        path = f"{rtype}.{key}"
        kept = _prune(resource[key], path, required, withheld, key)
        if kept is DROP:
            if path in required:  # the resource needs the element: mask, do not drop
                resource[key] = _mask(resource[key], withheld)
            else:
                del resource[key]
        else:
            resource[key] = kept
    return resource


def _prune(node: Any, path: str, required: frozenset[str], withheld: Callable[[str], bool], key: str) -> Any:
    if isinstance(node, list):
        kept = []
        for item in node:
            pruned = _prune(item, path, required, withheld, key)
            if pruned is DROP:
                if key == "modifierExtension":  # a modifier we cannot show: its element goes too
                    return DROP
                continue
            kept.append(pruned)
        return DROP if node and not kept else kept
    if not isinstance(node, dict):
        return node
    if key == "contained" and isinstance(node.get("resourceType"), str):
        return drop_references(node, withheld)
    reference = node.get("reference")
    if isinstance(reference, str) and withheld(reference):
        return DROP
    for child in list(node):
        child_path = f"{path}.{child}"
        pruned = _prune(node[child], child_path, required, withheld, child)
        if pruned is DROP:
            # An extension without its value, or an element without a part it requires, means
            # nothing (or something else): the element goes with it.
            if child_path in required or child == "modifierExtension":
                return DROP
            if key in ("extension", "modifierExtension") and child.startswith("value"):
                return DROP
            del node[child]
        else:
            node[child] = pruned
    return node


def _mask(node: Any, withheld: Callable[[str], bool]) -> Any:
    """Replace each withheld reference by a masked one, keeping the element's shape."""
    if isinstance(node, list):
        return [_mask(item, withheld) for item in node]
    if isinstance(node, dict):
        reference = node.get("reference")
        if isinstance(reference, str) and withheld(reference):
            return dict(MASKED_REFERENCE)
        return {key: _mask(value, withheld) for key, value in node.items()}
    return node

"""Security labels of a stored resource: the ones the rules give it, and the ones it already carries.

Two questions, answered here for every resource written:

1. **Which sensitivity labels do its codes call for?** The rules are FHIR ValueSets in ``fhir/``
   named ``ValueSet-mhr-sensitive-*.json``. Each one says which v3-ActCode sensitivity label it
   gives in ``useContext`` (usage-context-type ``focus``) and lists its codes as explicit
   ``compose.include.concept`` entries, so any FHIR tool can read it. A resource gets the label
   when any Coding anywhere in it (outside ``meta``; inside ``contained`` resources too) is in
   the ValueSet. Codes match exactly, except in code systems that are hierarchical by prefix
   (ICD-10, ICD-10-CM, ATC): there a listed concept also covers every code that starts with it
   once dots are removed (``F32`` covers ``F32.1``; ``J05AR`` covers ``J05AR03``). SNOMED CT is
   matched exactly: its hierarchy needs a terminology server, so the ValueSets enumerate the
   concepts (and the descendants in common use) instead.

2. **Which labels decide its disclosure?** Every ``meta.security`` coding (and, on a
   DocumentReference, every ``securityLabel``) is read into the resource's *label set*, the input
   of ``security.consent.decide`` and of the stored label token. What fails closed is the
   default: a label this module does not classify as harmless is in the set, and a label the
   consent decision cannot grant (``security.consent.GRANTABLE_LABELS``) makes the resource
   undisclosable to authorities. In detail:

   * v3-ActCode sensitivity codes (``security.consent.SENSITIVE_LABELS``) enter as their code
     (``ETH`` as ``SUD``, the code that replaced it);
   * v3-Confidentiality ``R`` and ``V`` enter as their code; ``U``, ``L``, ``M``, ``N`` do not
     restrict anything and are left out;
   * a few handling and integrity codes that restrict nothing (:data:`HARMLESS_LABELS`, e.g.
     v3-ActReason ``HTEST`` test data) are left out;
   * everything else (any other ActCode code such as a refrain policy, an unknown
     confidentiality code, an unknown system, a coding without system or code) enters as
     ``system|code``. No consent can name such a string, so no grant matches it.

``apply`` writes the labels the rules call for into ``meta.security`` before the resource is
encrypted, together with confidentiality ``R`` (a weaker confidentiality code beside a
sensitivity label is dropped as contradicting it), and returns the label set.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from security.consent import (
    CONFIDENTIALITY_RESTRICTED,
    GRANTABLE_LABELS,
    LABEL_SYNONYMS,
    SENSITIVE_LABELS,
)

ACT_CODE: Final = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONFIDENTIALITY: Final = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
ACT_REASON: Final = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
OBSERVATION_VALUE: Final = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
USAGE_CONTEXT_TYPE: Final = "http://terminology.hl7.org/CodeSystem/usage-context-type"

RULE_FILES: Final = "ValueSet-mhr-sensitive-*.json"

# Code systems whose codes are hierarchical by prefix: a code's ancestors are its prefixes.
PREFIX_SYSTEMS: Final[frozenset[str]] = frozenset(
    {
        "http://hl7.org/fhir/sid/icd-10",
        "http://hl7.org/fhir/sid/icd-10-cm",
        "http://www.whocc.no/atc",
    }
)

# Resource types the rules never label: the migrant itself, the consent that governs
# disclosure, and the service's own provenance. Every other type is labelled by its codes.
UNLABELLED_TYPES: Final[frozenset[str]] = frozenset({"Patient", "Consent", "Provenance", "Bundle"})

# meta.security codings that restrict nothing, so they stay out of the label set. Everything
# not listed here, and not a known sensitivity or confidentiality code, withholds the resource.
HARMLESS_LABELS: Final[frozenset[tuple[str, str]]] = frozenset(
    {
        (CONFIDENTIALITY, "U"),  # unrestricted
        (CONFIDENTIALITY, "L"),  # low
        (CONFIDENTIALITY, "M"),  # moderate
        (CONFIDENTIALITY, "N"),  # normal
        (ACT_REASON, "HTEST"),  # test health data
        # Integrity: how the content was altered or is vouched for, not who may see it.
        (OBSERVATION_VALUE, "ABSTRED"),
        (OBSERVATION_VALUE, "AGGRED"),
        (OBSERVATION_VALUE, "ANONYED"),
        (OBSERVATION_VALUE, "MAPPED"),
        (OBSERVATION_VALUE, "MASKED"),
        (OBSERVATION_VALUE, "PSEUDED"),
        (OBSERVATION_VALUE, "REDACTED"),
        (OBSERVATION_VALUE, "SUBSETTED"),
        (OBSERVATION_VALUE, "SYNTAC"),
        (OBSERVATION_VALUE, "TRSLT"),
        (OBSERVATION_VALUE, "VERSIONED"),
        (OBSERVATION_VALUE, "CRYTHASH"),
        (OBSERVATION_VALUE, "DIGSIG"),
    }
)

# HL7 v3 Confidentiality codes, least to most restrictive.
_CONFIDENTIALITY_RANK: Final[Mapping[str, int]] = {"U": 0, "L": 1, "M": 2, "N": 3, "R": 4, "V": 5}
_RESTRICTED_CODING: Final = {
    "system": CONFIDENTIALITY,
    "code": CONFIDENTIALITY_RESTRICTED,
    "display": "restricted",
}


def _fail(where: str, message: str) -> ValueError:
    return ValueError(f"security label rules: {where}: {message}")


def normalise_prefix_code(code: str) -> str:
    """A hierarchical code for prefix comparison: no dots, no surrounding space, upper case."""
    return code.strip().replace(".", "").upper()


@dataclass(frozen=True, slots=True)
class LabelRule:
    """One sensitivity ValueSet: the label it gives and its codes."""

    url: str
    label: str
    display: str | None
    exact: frozenset[tuple[str, str]]
    prefixes: frozenset[tuple[str, str]]  # (system, normalised code) in PREFIX_SYSTEMS


def read_rule(data: object, where: str) -> LabelRule:
    """Validate one ValueSet as a labelling rule; refuse anything the labeler would misread."""
    if not isinstance(data, dict) or data.get("resourceType") != "ValueSet":
        raise _fail(where, "not a ValueSet")
    url = data.get("url")
    if not isinstance(url, str) or not url:
        raise _fail(where, "missing url")
    if data.get("status") != "active":
        raise _fail(where, "status must be active")
    label, display = _focus_label(data.get("useContext"), where)
    compose = data.get("compose")
    if not isinstance(compose, dict) or set(compose) - {"include", "inactive", "lockedDate"}:
        raise _fail(where, "compose must hold include only (exclude is not supported)")
    includes = compose.get("include")
    if not isinstance(includes, list) or not includes:
        raise _fail(where, "compose.include must be a non-empty list")
    exact: set[tuple[str, str]] = set()
    prefixes: set[tuple[str, str]] = set()
    for i, include in enumerate(includes):
        iwhere = f"{where}: compose.include[{i}]"
        if not isinstance(include, dict) or set(include) - {"system", "version", "concept"}:
            raise _fail(iwhere, "only system, version and concept are supported (no filter, no valueSet)")
        system = include.get("system")
        concepts = include.get("concept")
        if not isinstance(system, str) or not system:
            raise _fail(iwhere, "missing system")
        if not isinstance(concepts, list) or not concepts:
            raise _fail(iwhere, "concept must be a non-empty list")
        for c, concept in enumerate(concepts):
            code = concept.get("code") if isinstance(concept, dict) else None
            if not isinstance(code, str) or not code.strip() or code != code.strip():
                raise _fail(f"{iwhere}.concept[{c}]", "expected a code")
            if system in PREFIX_SYSTEMS:
                prefixes.add((system, normalise_prefix_code(code)))
            else:
                exact.add((system, code))
    return LabelRule(url, label, display, frozenset(exact), frozenset(prefixes))


def _focus_label(value: object, where: str) -> tuple[str, str | None]:
    found: list[tuple[str, str | None]] = []
    for context in value if isinstance(value, list) else []:
        if not isinstance(context, dict):
            continue
        kind = context.get("code")
        if not (
            isinstance(kind, dict)
            and kind.get("system") == USAGE_CONTEXT_TYPE
            and kind.get("code") == "focus"
        ):
            continue
        concept = context.get("valueCodeableConcept")
        for coding in concept.get("coding", []) if isinstance(concept, dict) else []:
            if isinstance(coding, dict) and coding.get("system") == ACT_CODE:
                display = coding.get("display")
                found.append((str(coding.get("code")), display if isinstance(display, str) else None))
    if len(found) != 1:
        raise _fail(where, "needs exactly one useContext focus coding from v3-ActCode (the label it gives)")
    label, display = found[0]
    if label not in GRANTABLE_LABELS or label not in SENSITIVE_LABELS:
        raise _fail(where, f"label {label!r} is not a sensitivity label a consent can grant")
    return label, display


class SecurityLabeler:
    """Immutable after :meth:`load`; safe to share between requests and threads."""

    __slots__ = ("_displays", "_exact", "_prefix_lengths", "_prefixes", "_rules")

    def __init__(self, rules: Iterable[LabelRule]) -> None:
        self._rules = tuple(rules)
        if not self._rules:
            raise _fail("rules", "no sensitivity ValueSets")
        exact: dict[tuple[str, str], set[str]] = {}
        prefixes: dict[str, dict[str, set[str]]] = {}
        displays: dict[str, str | None] = {}
        for rule in self._rules:
            if displays.get(rule.label) is None:
                displays[rule.label] = rule.display
            for key in rule.exact:
                exact.setdefault(key, set()).add(rule.label)
            for system, prefix in rule.prefixes:
                prefixes.setdefault(system, {}).setdefault(prefix, set()).add(rule.label)
        self._exact = {k: frozenset(v) for k, v in exact.items()}
        self._prefixes = {s: {p: frozenset(v) for p, v in t.items()} for s, t in prefixes.items()}
        # Distinct prefix lengths per system, longest first: code[:n] is looked up for each n.
        self._prefix_lengths = {
            s: tuple(sorted({len(p) for p in t}, reverse=True)) for s, t in prefixes.items()
        }
        self._displays = displays

    @classmethod
    def load(cls, ig_dir: Path) -> SecurityLabeler:
        """Every ``ValueSet-mhr-sensitive-*.json`` of the implementation guide folder."""
        rules = []
        for path in sorted(ig_dir.glob(RULE_FILES)):
            try:
                data = orjson.loads(path.read_bytes())
            except orjson.JSONDecodeError as exc:
                raise _fail(path.name, f"not valid JSON: {exc}") from exc
            rules.append(read_rule(data, path.name))
        if not rules:
            raise _fail(str(ig_dir), f"no {RULE_FILES}")
        return cls(rules)

    @property
    def rules(self) -> tuple[LabelRule, ...]:
        return self._rules

    @property
    def label_universe(self) -> frozenset[str]:
        """Every label a consent can grant: a resource carrying any other matches no grant."""
        return GRANTABLE_LABELS

    # ------------------------------------------------------------------ queries

    def labels_for(self, resource: Mapping[str, Any]) -> frozenset[str]:
        """The sensitivity labels the rules give this resource (its meta.security is not read)."""
        if resource.get("resourceType") in UNLABELLED_TYPES:
            return frozenset()
        found: set[str] = set()
        for system, code in _codings(resource):
            hit = self._exact.get((system, code))
            if hit:
                found |= hit
            table = self._prefixes.get(system)
            if table is not None:
                text = normalise_prefix_code(code)
                for n in self._prefix_lengths[system]:
                    if len(text) >= n:
                        hit = table.get(text[:n])
                        if hit:
                            found |= hit
        return frozenset(found)

    def existing_labels(self, resource: Mapping[str, Any]) -> frozenset[str]:
        """The label set of the resource as it stands: see the module docstring."""
        found: set[str] = set()
        for coding in _security(resource):
            label = label_of(coding)
            if label is not None:
                found.add(label)
        return frozenset(found)

    def apply(self, resource: dict[str, Any]) -> frozenset[str]:
        """Write the labels the rules call for into meta.security; return the resource's label set.

        Other meta.security codings keep their place (an ETH coding becomes SUD); added labels
        follow, sorted by code, then confidentiality R unless R or V is already there. A
        resource with neither rule labels nor sensitivity labels of its own is left exactly as
        it was. Idempotent.
        """
        meta = resource.get("meta")
        if meta is not None and not isinstance(meta, dict):
            raise ValueError("resource meta is not an object")
        security = meta.get("security", []) if meta is not None else []
        if not isinstance(security, list):
            raise ValueError("resource meta.security is not a list")
        existing = self.existing_labels(resource)
        sensitive = (self.labels_for(resource) | existing) & SENSITIVE_LABELS
        if not sensitive:
            return existing

        kept: list[Any] = []
        present: set[str] = set()
        strong = False  # R or V already there
        for coding in security:
            if isinstance(coding, dict):
                system, code = coding.get("system"), coding.get("code")
                if system == ACT_CODE and isinstance(code, str) and code in LABEL_SYNONYMS:
                    coding = _coding(ACT_CODE, LABEL_SYNONYMS[code], self._displays.get(LABEL_SYNONYMS[code]))
                    code = coding["code"]
                if system == ACT_CODE and code in SENSITIVE_LABELS:
                    if code in present:
                        continue  # a duplicate (ETH beside SUD)
                    present.add(code)
                if system == CONFIDENTIALITY and isinstance(code, str):
                    rank = _CONFIDENTIALITY_RANK.get(code)
                    if rank is not None and rank < _CONFIDENTIALITY_RANK[CONFIDENTIALITY_RESTRICTED]:
                        continue  # a weaker confidentiality contradicts the sensitivity label
                    strong = strong or rank is not None
            kept.append(coding)
        for label in sorted(sensitive - present):
            kept.append(_coding(ACT_CODE, label, self._displays.get(label)))
        if not strong:
            kept.append(dict(_RESTRICTED_CODING))
        if meta is None:
            meta = resource["meta"] = {}
        meta["security"] = kept
        return self.existing_labels(resource)


def label_of(coding: object) -> str | None:
    """How one security coding enters the label set; None when it restricts nothing."""
    if not isinstance(coding, dict):
        return "|"
    system, code = coding.get("system"), coding.get("code")
    if not isinstance(system, str) or not isinstance(code, str) or not system or not code:
        return f"{system if isinstance(system, str) else ''}|{code if isinstance(code, str) else ''}"
    if (system, code) in HARMLESS_LABELS:
        return None
    if system == ACT_CODE:
        code = LABEL_SYNONYMS.get(code, code)
        if code in SENSITIVE_LABELS:
            return code
    elif system == CONFIDENTIALITY and code in ("R", "V"):
        return code
    # Contains "|", which no label a consent names does: it can never be granted.
    return f"{system}|{code}"


def _coding(system: str, code: str, display: str | None) -> dict[str, str]:
    coding = {"system": system, "code": code}
    if display is not None:
        coding["display"] = display
    return coding


def _security(resource: Mapping[str, Any]) -> Iterator[object]:
    """meta.security, and on a DocumentReference its securityLabel codings."""
    meta = resource.get("meta")
    if isinstance(meta, dict):
        security = meta.get("security")
        if isinstance(security, list):
            yield from security
    if resource.get("resourceType") == "DocumentReference":
        for concept in resource.get("securityLabel") or []:
            codings = concept.get("coding") if isinstance(concept, dict) else None
            if isinstance(codings, list):
                yield from codings
            else:
                yield concept  # not a CodeableConcept: unreadable, so it withholds


def _codings(resource: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(system, code) of every Coding-shaped object in the resource, meta excluded.

    Walking everything rather than a list of elements means a code cannot escape the rules by
    sitting in an element nobody thought of (an extension, a component, a contained Medication).
    """
    stack: list[Any] = [v for k, v in resource.items() if k != "meta"]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            system, code = node.get("system"), node.get("code")
            if isinstance(system, str) and isinstance(code, str):
                yield system, code
            stack.extend(v for k, v in node.items() if k != "meta")
        elif isinstance(node, list):
            stack.extend(node)

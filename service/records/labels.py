"""Sensitivity security labels (``meta.security``) from ``security-label-rules.json`` beside this module.

The rules file is a plain JSON document, not a FHIR resource. A resource of one of the listed
``resourceTypes`` gets a rule's label when any Coding in one of the listed ``elements`` matches
the rule: an exact ``(system, code)`` pair, or, for prefix rules, a code of that system whose
text with the dot removed starts with one of the prefixes (ICD-10 ``B20.1`` matches ``B20``).
Every labelled resource also gets the confidentiality coding of the file (``R``).

Loading validates the whole file and builds the lookup tables once; :meth:`SecurityLabeler.labels_for`
then costs one dict lookup per Coding plus one per distinct prefix length of its system, since
this runs on every resource at intake.

``ETH`` (the older v3 code for substance abuse information) found in existing ``meta.security``
is read as ``SUD``, as the rules file's description says, and rewritten as ``SUD``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import orjson

# Older label code -> the code that replaced it (only used when the target is in the universe).
LEGACY_LABELS: Final[Mapping[str, str]] = {"ETH": "SUD"}

# HL7 v3 Confidentiality codes, least to most restrictive.
_CONFIDENTIALITY_RANK: Final[Mapping[str, int]] = {"U": 0, "L": 1, "M": 2, "N": 3, "R": 4, "V": 5}

# Not a FHIR resource, so it lives here rather than in fhir/, where FHIR tools load every file.
RULES_FILE: Final = Path(__file__).with_name("security-label-rules.json")
_SEGMENT = re.compile(r"[A-Za-z][A-Za-z0-9]*")


def _fail(where: str, message: str) -> ValueError:
    return ValueError(f"security label rules: {where}: {message}")


def _obj(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, f"expected an object, got {type(value).__name__}")
    return value


def _opt_str(node: Mapping[str, Any], key: str, where: str) -> str | None:
    return _req_str(node, key, where) if key in node else None


def _req_str(node: Mapping[str, Any], key: str, where: str) -> str:
    if key not in node:
        raise _fail(where, f"missing key {key!r}")
    value = node[key]
    if not isinstance(value, str) or not value.strip():
        raise _fail(f"{where}.{key}", "expected a non-empty string")
    return value


def _list(node: Mapping[str, Any], key: str, where: str) -> list[Any]:
    if key not in node:
        raise _fail(where, f"missing key {key!r}")
    value = node[key]
    if not isinstance(value, list):
        raise _fail(f"{where}.{key}", f"expected a list, got {type(value).__name__}")
    return value


def _str_list(node: Mapping[str, Any], key: str, where: str, *, non_empty: bool = True) -> list[str]:
    items = _list(node, key, where)
    if non_empty and not items:
        raise _fail(f"{where}.{key}", "must not be empty")
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            raise _fail(f"{where}.{key}[{i}]", "expected a non-empty string")
    return items


def _normalise_prefix_text(code: str) -> str:
    """ICD-10 text for prefix comparison: no dot, no surrounding space, upper case."""
    return code.strip().replace(".", "").upper()


class SecurityLabeler:
    """Immutable after :meth:`load`; safe to share between requests and threads."""

    __slots__ = (
        "_conf_code",
        "_conf_display",
        "_conf_system",
        "_displays",
        "_elements",
        "_exact",
        "_label_system",
        "_legacy",
        "_prefix_lengths",
        "_prefixes",
        "_resource_types",
        "_universe",
    )

    def __init__(
        self,
        *,
        label_system: str,
        elements: tuple[tuple[str, ...], ...],
        resource_types: frozenset[str],
        confidentiality: tuple[str, str, str | None],
        exact: dict[tuple[str, str], frozenset[str]],
        prefixes: dict[str, dict[str, frozenset[str]]],
        displays: dict[str, str | None],
    ) -> None:
        self._label_system = label_system
        self._elements = elements
        self._resource_types = resource_types
        self._conf_system, self._conf_code, self._conf_display = confidentiality
        self._exact = exact
        self._prefixes = prefixes
        # Distinct prefix lengths per system, longest first: code[:n] is looked up for each n.
        self._prefix_lengths: dict[str, tuple[int, ...]] = {
            system: tuple(sorted({len(p) for p in table}, reverse=True)) for system, table in prefixes.items()
        }
        self._displays = displays
        self._universe = frozenset(displays)
        self._legacy: dict[str, str] = {
            old: new
            for old, new in LEGACY_LABELS.items()
            if new in self._universe and old not in self._universe
        }

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: Path) -> SecurityLabeler:
        try:
            data = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"security label rules: {path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: object) -> SecurityLabeler:
        root = _obj(data, "document")
        label_system = _req_str(root, "labelSystem", "document")

        elements: list[tuple[str, ...]] = []
        for i, element in enumerate(_str_list(root, "elements", "document")):
            segments = tuple(element.split("."))
            if not all(_SEGMENT.fullmatch(s) for s in segments):
                raise _fail(f"elements[{i}]", f"{element!r} is not a dotted path of element names")
            elements.append(segments)

        resource_types = frozenset(_str_list(root, "resourceTypes", "document"))

        if "confidentiality" not in root:
            raise _fail("document", "missing key 'confidentiality'")
        conf = _obj(root["confidentiality"], "confidentiality")
        confidentiality = (
            _req_str(conf, "system", "confidentiality"),
            _req_str(conf, "code", "confidentiality"),
            _opt_str(conf, "display", "confidentiality"),
        )

        rules = _list(root, "rules", "document")
        if not rules:
            raise _fail("rules", "must not be empty")
        exact: dict[tuple[str, str], set[str]] = {}
        prefixes: dict[str, dict[str, set[str]]] = {}
        displays: dict[str, str | None] = {}
        for r, raw_rule in enumerate(rules):
            where = f"rules[{r}]"
            rule = _obj(raw_rule, where)
            if "label" not in rule:
                raise _fail(where, "missing key 'label'")
            label = _obj(rule["label"], f"{where}.label")
            if _req_str(label, "system", f"{where}.label") != label_system:
                raise _fail(f"{where}.label.system", f"must equal labelSystem {label_system!r}")
            code = _req_str(label, "code", f"{where}.label")
            if code in displays:
                raise _fail(f"{where}.label.code", f"label {code!r} has more than one rule")
            displays[code] = _opt_str(label, "display", f"{where}.label")

            for c, raw_coding in enumerate(_list(rule, "codes", where)):
                cwhere = f"{where}.codes[{c}]"
                coding = _obj(raw_coding, cwhere)
                key = (_req_str(coding, "system", cwhere), _req_str(coding, "code", cwhere))
                exact.setdefault(key, set()).add(code)

            for p, raw_prefix in enumerate(_list(rule, "prefixes", where)):
                pwhere = f"{where}.prefixes[{p}]"
                entry = _obj(raw_prefix, pwhere)
                table = prefixes.setdefault(_req_str(entry, "system", pwhere), {})
                for i, prefix in enumerate(_str_list(entry, "prefixes", pwhere)):
                    text = _normalise_prefix_text(prefix)
                    if not text:
                        raise _fail(f"{pwhere}.prefixes[{i}]", f"{prefix!r} is empty once the dot is removed")
                    table.setdefault(text, set()).add(code)

        return cls(
            label_system=label_system,
            elements=tuple(elements),
            resource_types=resource_types,
            confidentiality=confidentiality,
            exact={k: frozenset(v) for k, v in exact.items()},
            prefixes={s: {p: frozenset(v) for p, v in t.items()} for s, t in prefixes.items()},
            displays=displays,
        )

    # ------------------------------------------------------------------ queries

    @property
    def label_system(self) -> str:
        return self._label_system

    @property
    def label_universe(self) -> frozenset[str]:
        """Every sensitivity label code the rules can produce."""
        return self._universe

    def labels_for(self, resource: Mapping[str, Any]) -> frozenset[str]:
        """The sensitivity label codes the rules give this resource (existing meta.security ignored)."""
        if resource.get("resourceType") not in self._resource_types:
            return frozenset()
        found: set[str] = set()
        for path in self._elements:
            for system, code in _codings(resource, path):
                hit = self._exact.get((system, code))
                if hit:
                    found |= hit
                table = self._prefixes.get(system)
                if table is not None:
                    text = _normalise_prefix_text(code)
                    for n in self._prefix_lengths[system]:
                        if len(text) >= n:
                            hit = table.get(text[:n])
                            if hit:
                                found |= hit
        return frozenset(found)

    def existing_labels(self, resource: Mapping[str, Any]) -> frozenset[str]:
        """Sensitivity labels of the universe already in meta.security (ETH read as SUD)."""
        found: set[str] = set()
        for coding in _security(resource):
            if coding.get("system") == self._label_system:
                label = self._canonical_label(coding.get("code"))
                if label is not None:
                    found.add(label)
        return frozenset(found)

    def apply(self, resource: dict[str, Any]) -> frozenset[str]:
        """Write the resource's sensitivity labels (and confidentiality) into meta.security.

        Returns ``labels_for(resource)`` united with the universe labels already present. Other
        meta.security codings keep their place; the sensitivity labels follow, sorted by code,
        then the confidentiality coding. A resource with no label is left exactly as it was.
        Idempotent.
        """
        labels = self.labels_for(resource) | self.existing_labels(resource)
        if not labels:
            return labels
        meta = resource.get("meta")
        if meta is None:
            meta = resource["meta"] = {}
        elif not isinstance(meta, dict):
            raise ValueError("resource meta is not an object")
        security = meta.get("security", [])
        if not isinstance(security, list):
            raise ValueError("resource meta.security is not a list")

        kept: list[Any] = []
        stronger_confidentiality = False
        wanted_rank = _CONFIDENTIALITY_RANK.get(self._conf_code)
        for coding in security:
            if isinstance(coding, dict):
                system, code = coding.get("system"), coding.get("code")
                if system == self._label_system and self._canonical_label(code) is not None:
                    continue  # rewritten below
                if system == self._conf_system and isinstance(code, str):
                    if code == self._conf_code:
                        continue  # rewritten below
                    rank = _CONFIDENTIALITY_RANK.get(code)
                    if rank is not None and wanted_rank is not None:
                        if rank < wanted_rank:
                            continue  # a weaker confidentiality contradicts the label
                        stronger_confidentiality = True
            kept.append(coding)

        for label in sorted(labels):
            kept.append(_coding(self._label_system, label, self._displays.get(label)))
        if not stronger_confidentiality:
            kept.append(_coding(self._conf_system, self._conf_code, self._conf_display))
        meta["security"] = kept
        return labels

    def _canonical_label(self, code: object) -> str | None:
        if not isinstance(code, str):
            return None
        if code in self._universe:
            return code
        return self._legacy.get(code)


def _coding(system: str, code: str, display: str | None) -> dict[str, str]:
    coding = {"system": system, "code": code}
    if display is not None:
        coding["display"] = display
    return coding


def _security(resource: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    meta = resource.get("meta")
    if isinstance(meta, dict):
        security = meta.get("security")
        if isinstance(security, list):
            for coding in security:
                if isinstance(coding, dict):
                    yield coding


def _codings(resource: Mapping[str, Any], path: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    """(system, code) of every Coding at ``path``; each segment may hold a list.

    The element may be a CodeableConcept (its ``coding`` list) or a bare Coding.
    """
    nodes: list[Any] = [resource]
    for segment in path:
        nxt: list[Any] = []
        for node in nodes:
            if isinstance(node, dict):
                value = node.get(segment)
                if isinstance(value, list):
                    nxt.extend(value)
                elif value is not None:
                    nxt.append(value)
        if not nxt:
            return
        nodes = nxt
    for node in nodes:
        if not isinstance(node, dict):
            continue
        coding_list = node.get("coding")
        candidates = coding_list if isinstance(coding_list, list) else [node]
        for coding in candidates:
            if isinstance(coding, dict):
                system, code = coding.get("system"), coding.get("code")
                if isinstance(system, str) and isinstance(code, str):
                    yield system, code

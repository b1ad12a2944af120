"""Validate submitted FHIR resources: structure, the base specification's required bindings,
then the profiles of the guide in ``fhir/``.

The wire version is FHIR R4 (4.0.1). Structure is checked with ``fhir.resources.R4B`` models:
fhir.resources (8.x) ships R5, R4B and STU3 models but no R4 ones, and for the resource types
this service accepts R4B is structurally R4 (R4B changed the medication-definition and
evidence resources, none of them used here). The R4-specific layers (required bindings, the
guide's profiles with snapshots over the R4 definitions) come from the official R4 data.

Three layers:

1. Structure: ``fhir.resources.R4B`` parses the resource. Pydantic errors become issues with a
   FHIRPath expression built from the error location and a message written here from the
   error *type* only, because pydantic messages carry the submitted value (possibly PHI).
2. Base rules: every ``required`` binding of FHIR R4 itself (:mod:`.core_bindings`), such as
   ``Patient.gender`` or ``Observation.status``. Layers 1 and 2 mark their issues ``basic``
   (answered 400 on a write); profile issues are answered 422.
3. Profiles: the StructureDefinitions of the guide (``derivation = constraint``) are compiled
   once into rules from their ``differential.element`` entries: ``min``/``max``, ``fixed[x]``,
   ``pattern[x]``, ``type`` (for choice elements) and ``required`` bindings to local ValueSets.
   No clinical rule lives in this module; change the JSON and the results change.

A profile applies to a resource when ``meta.profile`` claims it, or automatically, as its
``https://mhr.example.org/fhir/StructureDefinition/auto-apply`` extension says: ``valueBoolean``
true applies it to every resource of its type; ``valueString`` names an element path (such as
``Observation.code``) whose pattern, fixed value or required binding selects the resources.

In addition every Coding must carry a ``system`` (the design insists on it: LOINC 2106-3 is also
a CDC race code). Diagnostics never contain submitted values: they say which rule failed.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import fhir_core.types
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.resource import Resource
from pydantic import ValidationError

from service.fhir_validation.core_bindings import CoreBindings
from service.fhir_validation.ig import Code, IGError, ImplementationGuide, JSONObject
from service.fhir_validation.issue import Issue

# fhir.resources looks up a model class by its dotted name (pydantic's ``import_string``:
# an import machinery round trip) for every resource it parses, Bundle entries included.
# The names come from fhir.resources' own type map, so the set is small and fixed; the
# answer for a name never changes once its module is imported. Cached, validation of an
# exam Bundle costs about a fifth less CPU.
_import_string = getattr(fhir_core.types, "import_string", None)
if callable(_import_string) and not hasattr(_import_string, "cache_info"):
    fhir_core.types.import_string = functools.lru_cache(maxsize=4096)(_import_string)  # type: ignore[attr-defined]

AUTO_APPLY_URL: Final = "https://mhr.example.org/fhir/StructureDefinition/auto-apply"

_MISSING: Final[Any] = object()
_UNSUPPORTED_ELEMENT_KEYS: Final = (
    "slicing",
    "sliceName",
    "constraint",
    "contentReference",
    "maxLength",
)
_UNSUPPORTED_ELEMENT_PREFIXES: Final = ("minValue", "maxValue")
_CODING_KEYS: Final = frozenset({"id", "extension", "system", "version", "code", "display"}) | {
    "userSelected"
}
_ELEMENT_NAME: Final = re.compile(r"^_?[A-Za-z][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class _Rule:
    profile: str  # the profile's id, for messages
    path: str  # element path as written in the profile, e.g. Observation.component.code
    parent: tuple[str, ...]  # segments below the resource root leading to the parent element
    name: str  # last segment; may end in [x]
    min: int
    max: int | None  # None: unbounded
    types: tuple[str, ...]  # allowed choice types as written; empty = no restriction
    types_lower: frozenset[str]
    fixed: Any
    pattern: Any
    binding_url: str | None
    binding: frozenset[Code]
    binding_codes: frozenset[str]


@dataclass(frozen=True)
class _Profile:
    url: str
    id: str
    type: str
    rules: tuple[_Rule, ...]
    auto_all: bool
    selectors: tuple[_Rule, ...]  # rules whose constraints select resources automatically


# --------------------------------------------------------------------------- compilation


def _constraint_value(element: JSONObject, prefix: str) -> Any:
    for key, value in element.items():
        if key.startswith(prefix) and key[len(prefix) : len(prefix) + 1].isupper():
            return value
    return _MISSING


def _compile_element(ig: ImplementationGuide, sd: JSONObject, element: JSONObject) -> _Rule | None:
    sd_id = str(sd.get("id", sd["url"]))
    path = element.get("path")
    if not isinstance(path, str):
        raise IGError(f"{sd_id}: an element has no path")
    for key in element:
        if key in _UNSUPPORTED_ELEMENT_KEYS or key.startswith(_UNSUPPORTED_ELEMENT_PREFIXES):
            raise IGError(f"{sd_id}: {path} uses '{key}', which this validator does not enforce")
    segments = path.split(".")
    if segments[0] != sd["type"]:
        raise IGError(f"{sd_id}: element path {path} does not start with {sd['type']}")
    if len(segments) == 1:
        return None  # the root element carries no rule we enforce
    max_text = element.get("max")
    types = tuple(str(t["code"]) for t in element.get("type", []))
    binding_url: str | None = None
    binding: frozenset[Code] = frozenset()
    spec = element.get("binding")
    if isinstance(spec, dict) and spec.get("strength") == "required":
        binding_url = spec.get("valueSet")
        if not isinstance(binding_url, str):
            raise IGError(f"{sd_id}: {path} has a required binding without a valueSet")
        binding = ig.expand(binding_url)
    return _Rule(
        profile=sd_id,
        path=path,
        parent=tuple(segments[1:-1]),
        name=segments[-1],
        min=int(element.get("min", 0)),
        max=None if max_text in (None, "*") else int(max_text),
        types=types,
        types_lower=frozenset(t.lower() for t in types),
        fixed=_constraint_value(element, "fixed"),
        pattern=_constraint_value(element, "pattern"),
        binding_url=binding_url,
        binding=binding,
        binding_codes=frozenset(code for _, code in binding),
    )


def _compile_rules(ig: ImplementationGuide, sd: JSONObject, seen: frozenset[str]) -> list[_Rule]:
    rules: list[_Rule] = []
    base = sd.get("baseDefinition", "")
    if base in ig.by_url:
        if base in seen:
            raise IGError(f"profile derivation cycle through {base}")
        rules.extend(_compile_rules(ig, ig.resource(base, "StructureDefinition"), seen | {base}))
    elif base != f"http://hl7.org/fhir/StructureDefinition/{sd['type']}":
        raise IGError(f"{sd.get('id')}: base definition {base} is neither core nor in the guide")
    for element in sd.get("differential", {}).get("element", []):
        rule = _compile_element(ig, sd, element)
        if rule is not None:
            rules.append(rule)
    return rules


def _compile_profile(ig: ImplementationGuide, sd: JSONObject) -> _Profile:
    rules = tuple(_compile_rules(ig, sd, frozenset({sd["url"]})))
    auto_all = False
    selectors: tuple[_Rule, ...] = ()
    for ext in sd.get("extension", []):
        if ext.get("url") != AUTO_APPLY_URL:
            continue
        if ext.get("valueBoolean") is True:
            auto_all = True
        elif isinstance(ext.get("valueString"), str):
            selectors = tuple(r for r in rules if r.path == ext["valueString"])
            if not selectors:
                raise IGError(f"{sd.get('id')}: auto-apply names {ext['valueString']}, not in it")
    return _Profile(
        url=sd["url"],
        id=str(sd.get("id", sd["url"])),
        type=sd["type"],
        rules=rules,
        auto_all=auto_all,
        selectors=selectors,
    )


# --------------------------------------------------------------------------- navigation


def _children(node: Any, name: str) -> list[tuple[str, str, Any]]:
    """(expression suffix, choice-type suffix, value) of element ``name`` in ``node``."""
    if not isinstance(node, dict):
        return []
    found: list[tuple[str, str, Any]] = []
    if name.endswith("[x]"):
        base = name[:-3]
        keys = [
            (key, key[len(base) :])
            for key in node
            if key.startswith(base) and key[len(base) : len(base) + 1].isupper()
        ]
    else:
        keys = [(name, "")] if name in node else []
    for key, type_suffix in keys:
        value = node[key]
        if isinstance(value, list):
            found.extend((f".{key}[{i}]", type_suffix, item) for i, item in enumerate(value))
        else:
            found.append((f".{key}", type_suffix, value))
    return found


def _select(root: Any, root_expr: str, segments: tuple[str, ...]) -> list[tuple[str, Any]]:
    current: list[tuple[str, Any]] = [(root_expr, root)]
    for segment in segments:
        current = [
            (expr + suffix, value) for expr, node in current for suffix, _, value in _children(node, segment)
        ]
    return current


def _matches_pattern(value: Any, pattern: Any) -> bool:
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(
            key in value and _matches_pattern(value[key], sub) for key, sub in pattern.items()
        )
    if isinstance(pattern, list):
        return isinstance(value, list) and all(
            any(_matches_pattern(item, sub) for item in value) for sub in pattern
        )
    return type(value) is type(pattern) and bool(value == pattern)


# --------------------------------------------------------------------------- checks


def _binding_issue(rule: _Rule, expr: str, value: Any) -> Issue | None:
    where = f"{rule.profile}: {rule.path} has a required binding to {rule.binding_url}"
    if isinstance(value, str):
        if value in rule.binding_codes:
            return None
        return Issue("error", "code-invalid", expr, f"{where}; the code is not in that ValueSet")
    if not isinstance(value, dict):
        return None  # the structural layer reports wrong types
    if "coding" in value or ("text" in value and "code" not in value):
        codings = value.get("coding")
        codings = codings if isinstance(codings, list) else []
        if any(isinstance(c, dict) and (c.get("system"), c.get("code")) in rule.binding for c in codings):
            return None
        if not codings:
            return Issue("error", "code-invalid", expr, f"{where}; no coding is given")
        target = f"{expr}.coding[0].code" if len(codings) == 1 else expr
        return Issue("error", "code-invalid", target, f"{where}; no coding is in that ValueSet")
    if (value.get("system"), value.get("code")) in rule.binding:
        return None
    return Issue("error", "code-invalid", f"{expr}.code", f"{where}; the coding is not in that ValueSet")


def _value_issues(rule: _Rule, expr: str, type_suffix: str, value: Any) -> list[Issue]:
    issues: list[Issue] = []
    if rule.types and type_suffix and type_suffix.lower() not in rule.types_lower:
        issues.append(
            Issue(
                "error",
                "structure",
                expr,
                f"{rule.profile}: {rule.path} allows only {', '.join(rule.types)}",
            )
        )
        return issues
    if rule.fixed is not _MISSING and value != rule.fixed:
        issues.append(
            Issue("error", "value", expr, f"{rule.profile}: {rule.path} must equal its fixed value")
        )
    if rule.pattern is not _MISSING and not _matches_pattern(value, rule.pattern):
        issues.append(
            Issue(
                "error",
                "value",
                expr,
                f"{rule.profile}: {rule.path} does not match the pattern the profile requires",
            )
        )
    if rule.binding_url is not None:
        issue = _binding_issue(rule, expr, value)
        if issue is not None:
            issues.append(issue)
    return issues


def _rule_issues(rule: _Rule, resource: JSONObject, root_expr: str) -> list[Issue]:
    issues: list[Issue] = []
    for parent_expr, parent in _select(resource, root_expr, rule.parent):
        if not isinstance(parent, dict):
            continue
        children = _children(parent, rule.name)
        where = f"{parent_expr}.{rule.name}"
        if len(children) < rule.min:
            issues.append(
                Issue(
                    "error",
                    "required",
                    where,
                    f"{rule.profile}: {rule.path} requires at least {rule.min} (found {len(children)})",
                )
            )
        if rule.max is not None and len(children) > rule.max:
            issues.append(
                Issue(
                    "error",
                    "structure",
                    where,
                    f"{rule.profile}: {rule.path} allows at most {rule.max} (found {len(children)})",
                )
            )
        for suffix, type_suffix, value in children:
            issues.extend(_value_issues(rule, parent_expr + suffix, type_suffix, value))
    return issues


def _selects(profile: _Profile, resource: JSONObject) -> bool:
    if profile.auto_all:
        return True
    if not profile.selectors:
        return False
    for rule in profile.selectors:
        values = [
            (expr + suffix, type_suffix, value)
            for expr, parent in _select(resource, "", rule.parent)
            for suffix, type_suffix, value in _children(parent, rule.name)
        ]
        if not any(not _value_issues(rule, expr, t, v) for expr, t, v in values):
            return False
    return True


def _looks_like_coding(node: JSONObject) -> bool:
    return isinstance(node.get("code"), str) and node.keys() <= _CODING_KEYS


def _coding_issues(node: Any, expr: str, in_coding: bool, out: list[Issue]) -> None:
    if isinstance(node, dict):
        if (in_coding or _looks_like_coding(node)) and not node.get("system"):
            out.append(
                Issue(
                    "error",
                    "required",
                    f"{expr}.system",
                    "Coding has no system: every Coding must name its code system",
                )
            )
        for key, value in node.items():
            if isinstance(value, list):
                for i, item in enumerate(value):
                    _coding_issues(item, f"{expr}.{key}[{i}]", key == "coding", out)
            elif isinstance(value, dict):
                _coding_issues(value, f"{expr}.{key}", False, out)


def _loc_expression(root_expr: str, loc: tuple[int | str, ...]) -> str:
    parts = [root_expr]
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif _ELEMENT_NAME.match(part):
            parts.append(f".{part}")
    return "".join(parts)


def _structural_issue(error: Any, root_expr: str) -> Issue:
    kind = str(error.get("type", "unknown"))
    loc = tuple(error.get("loc", ()))
    expression = _loc_expression(root_expr, loc)
    if kind == "extra_forbidden":
        return Issue("error", "structure", expression, "Element is not defined for this type", basic=True)
    if kind.endswith("missing"):
        return Issue("error", "required", expression, "Required element is missing", basic=True)
    if kind.endswith("_type") or kind == "fhir-validation-wrong-resource-type":
        return Issue("error", "structure", expression, f"Element has the wrong type ({kind})", basic=True)
    if not loc:
        return Issue(
            "error",
            "structure",
            expression,
            "The resource breaks a structural rule of its type (such as two variants of one choice element)",
            basic=True,
        )
    return Issue(
        "error", "value", expression, f"Value is not valid for the element's datatype ({kind})", basic=True
    )


def _resource_class(resource_type: Any) -> Any:
    if not isinstance(resource_type, str):
        return None
    return _resource_class_named(resource_type)


@functools.lru_cache(maxsize=512)  # bounded: resourceType is whatever the client sent
def _resource_class_named(resource_type: str) -> Any:
    try:
        cls = get_fhir_model_class(resource_type)
    except ValueError:
        return None
    return cls if isinstance(cls, type) and issubclass(cls, Resource) else None


def _dedupe(issues: list[Issue]) -> list[Issue]:
    return list(dict.fromkeys(issues))


# --------------------------------------------------------------------------- validator


class ProfileValidator:
    """Validates resources against FHIR R4 and the profiles of one implementation guide."""

    def __init__(self, ig: ImplementationGuide, core: CoreBindings | None = None) -> None:
        self.ig = ig
        self.core = core if core is not None else CoreBindings.load()
        profiles = [
            _compile_profile(ig, sd)
            for sd in ig.resources("StructureDefinition")
            if sd.get("derivation") == "constraint" and sd.get("kind") == "resource"
        ]
        self._by_url: dict[str, _Profile] = {p.url: p for p in profiles}
        self._auto: dict[str, list[_Profile]] = {}
        for profile in profiles:
            if profile.auto_all or profile.selectors:
                self._auto.setdefault(profile.type, []).append(profile)

    @classmethod
    def load(cls, ig_dir: Path, *, warm_up: bool = True) -> ProfileValidator:
        """Load and index the guide once. ``warm_up`` parses the guide's example Bundles so
        that fhir.resources builds its lazy validators at start-up, not on the first request."""
        validator = cls(ImplementationGuide.load(ig_dir))
        if warm_up:
            for bundle in validator.ig.resources("Bundle"):
                validator.validate_bundle(bundle)
        return validator

    @property
    def profile_urls(self) -> list[str]:
        return sorted(self._by_url)

    def applicable_profiles(self, resource: JSONObject) -> list[str]:
        """Canonical URLs of the profiles that apply to ``resource`` (claimed or automatic)."""
        profiles, _ = self._applicable(resource, str(resource.get("resourceType", "Resource")))
        return [p.url for p in profiles]

    # ---- public API

    def validate(self, resource: Any) -> list[Issue]:
        """Validate one resource (a Bundle is validated with its entries)."""
        if isinstance(resource, dict) and resource.get("resourceType") == "Bundle":
            return self.validate_bundle(resource)
        root_expr, issue = self._shape(resource, None)
        if issue is not None:
            return [issue]
        issues = self._structure(resource, root_expr)
        issues.extend(self.core.issues(resource, root_expr))
        _coding_issues(resource, root_expr, False, issues)
        issues.extend(self._profile_issues(resource, root_expr))
        return _dedupe(issues)

    def validate_bundle(self, bundle: Any) -> list[Issue]:
        """Validate a Bundle and every ``entry.resource``; entry expressions are prefixed
        ``Bundle.entry[i].resource``."""
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            return [Issue("error", "structure", "Bundle", "Expected a Bundle resource", basic=True)]
        issues: list[Issue] = []
        entries = bundle.get("entry")
        checked: list[tuple[str, JSONObject]] = []
        parseable = bundle
        if isinstance(entries, list):
            safe_entries: list[Any] = []
            for i, entry in enumerate(entries):
                if isinstance(entry, dict) and "resource" in entry:
                    prefix = f"Bundle.entry[{i}].resource"
                    _, problem = self._shape(entry["resource"], prefix)
                    if problem is not None:
                        issues.append(problem)
                        entry = {k: v for k, v in entry.items() if k != "resource"}
                    else:
                        checked.append((prefix, entry["resource"]))
                safe_entries.append(entry)
            parseable = {**bundle, "entry": safe_entries}
        issues.extend(self._structure(parseable, "Bundle"))
        issues.extend(self.core.issues(bundle, "Bundle"))
        for prefix, resource in checked:
            issues.extend(self.core.issues(resource, prefix))
        _coding_issues(bundle, "Bundle", False, issues)
        issues.extend(self._profile_issues(bundle, "Bundle"))
        for prefix, resource in checked:
            issues.extend(self._profile_issues(resource, prefix))
        return _dedupe(issues)

    # ---- layers

    @staticmethod
    def _shape(resource: Any, prefix: str | None) -> tuple[str, Issue | None]:
        if not isinstance(resource, dict):
            where = prefix or "Resource"
            return where, Issue("error", "structure", where, "A resource must be a JSON object", basic=True)
        resource_type = resource.get("resourceType")
        root_expr = prefix or (resource_type if isinstance(resource_type, str) else "Resource")
        if _resource_class(resource_type) is None:
            return root_expr, Issue(
                "error",
                "structure",
                f"{root_expr}.resourceType",
                "resourceType is missing or not a FHIR resource type",
                basic=True,
            )
        return root_expr, None

    @staticmethod
    def _structure(resource: JSONObject, root_expr: str) -> list[Issue]:
        cls = _resource_class(resource.get("resourceType"))
        try:
            cls.model_validate(resource)
        except ValidationError as exc:
            return [_structural_issue(error, root_expr) for error in exc.errors()]
        except (KeyError, TypeError, ValueError, AttributeError):
            return [
                Issue(
                    "error",
                    "structure",
                    root_expr,
                    "The resource could not be parsed as FHIR (e.g. an unknown contained type)",
                    basic=True,
                )
            ]
        return []

    def _applicable(self, resource: JSONObject, root_expr: str) -> tuple[list[_Profile], list[Issue]]:
        resource_type = resource.get("resourceType")
        selected: dict[str, _Profile] = {}
        issues: list[Issue] = []
        meta = resource.get("meta")
        claims = meta.get("profile", []) if isinstance(meta, dict) else []
        for i, claim in enumerate(claims if isinstance(claims, list) else []):
            if not isinstance(claim, str):
                continue
            profile = self._by_url.get(claim.split("|", 1)[0])
            where = f"{root_expr}.meta.profile[{i}]"
            if profile is None:
                issues.append(Issue("warning", "not-supported", where, "Claimed profile is not in the guide"))
            elif profile.type != resource_type:
                issues.append(Issue("error", "structure", where, f"{profile.id} is for {profile.type}"))
            else:
                selected[profile.url] = profile
        for profile in self._auto.get(str(resource_type), []):
            if profile.url not in selected and _selects(profile, resource):
                selected[profile.url] = profile
        return list(selected.values()), issues

    def _profile_issues(self, resource: JSONObject, root_expr: str) -> list[Issue]:
        profiles, issues = self._applicable(resource, root_expr)
        for profile in profiles:
            for rule in profile.rules:
                issues.extend(_rule_issues(rule, resource, root_expr))
        return issues

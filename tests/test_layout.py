"""The layout holds: no import cycle between packages of service/ and security/, no module loose.

A package is the first two components of a module path (``service.records``, ``security.keys``;
a module loose in service/ would count as its own package, and none is left there). Every
import counts, at module level or inside a function (a function-local import only defers a
dependency, it does not remove it), except those under ``if TYPE_CHECKING:``: they never run,
and name what a component is handed (a job handler is handed the Runtime that runs it).
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP_PACKAGES = ("service", "security")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for top in TOP_PACKAGES for p in sorted((ROOT / top).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """Every module path an import statement names (``from a import b`` names a and a.b)."""
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            yield source
            yield from (f"{source}.{alias.name}" for alias in node.names)
        pending.extend(ast.iter_child_nodes(node))


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def package_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for target in _imports(tree, module, path.name == "__init__.py"):
            if target in modules and _package(target) != _package(module):
                graph[_package(module)].add(_package(target))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one package (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(set(graph) | {t for targets in graph.values() for t in targets}):
        if node not in index:
            visit(node)
    return found


def test_no_package_import_cycle() -> None:
    graph = package_graph()
    assert graph["service.records"], "the import graph came out empty: the walk is broken"
    assert cycles(graph) == []


def test_security_imports_nothing_from_service() -> None:
    # security/ is pure (crypto, tokens, the consent decision): no HTTP, no database.
    graph = package_graph()
    assert (
        sorted(
            t
            for p, targets in graph.items()
            if p.startswith("security")
            for t in targets
            if t.startswith("service")
        )
        == []
    )


def test_the_cycle_check_sees_a_cycle() -> None:
    # The check itself: a two-package cycle and a three-package one are both reported.
    graph = {"a.x": {"a.y"}, "a.y": {"a.x", "a.z"}, "a.z": {"a.w"}, "a.w": {"a.v"}, "a.v": {"a.z"}}
    assert cycles(graph) == [["a.v", "a.w", "a.z"], ["a.x", "a.y"]]


def test_type_checking_imports_are_not_edges_but_function_imports_are() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from service.runtime.providers import Runtime\n"
        "def f():\n    from service.store import database\n"
    )
    names = set(_imports(ast.parse(source), "service.app.demo", False))
    assert "service.runtime.providers" not in names
    assert {"service.store", "service.store.database"} <= names


def test_no_module_is_loose_in_service() -> None:
    # Every module lives in the package of its concern (README, Layout): a newcomer finds it by
    # its role, and the package graph above sees it as part of that package. Only the package
    # itself and ``python -m service`` stay at the top.
    loose = sorted(
        p.name for p in (ROOT / "service").glob("*.py") if p.name not in {"__init__.py", "__main__.py"}
    )
    assert loose == []


def test_only_the_cli_imports_the_composition_root() -> None:
    # service/app/ composes everything (routers, runtime, workers): anything it composes that
    # imported it back would be a cycle waiting for its second edge.
    graph = package_graph()
    assert sorted(p for p, targets in graph.items() if "service.app" in targets) == ["service.cli"]


def test_core_imports_nothing_else_from_service() -> None:
    # service/core/ (settings, shutdown state, metrics, request id, offload) is what every layer
    # may import; it can be that only while it imports none of them.
    graph = package_graph()
    assert sorted(t for t in graph.get("service.core", ()) if t.startswith("service")) == []


def test_every_path_the_readme_layout_names_exists() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`((?:service|security|tests)/[\w/]*\w(?:\.py)?/?)`", layout))
    assert named, "the Layout section names no path: the pattern is broken"
    assert sorted(n for n in named if not (ROOT / n).exists()) == []

"""The package's import structure, read from the sources: no import cycle between lowrank's
modules (lazy imports inside functions included, which a run-time import test cannot see
once the package is loaded), and runtime dependencies that are exactly the third-party
packages the library imports at module level."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"lowrank": ROOT / "lowrank", "lowrank.kernels": ROOT / "kernels"}


def _modules() -> dict[str, Path]:
    """`{dotted name: path}` of every module of the package (`lowrank.kernels` is `kernels/`)."""
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = _modules()


def _absolute(module: str, level: int, name: str | None) -> str:
    """The dotted name a (possibly relative) `from … import` in `module` refers to."""
    if level == 0:
        return name or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    base = package.rsplit(".", level - 1)[0] if level > 1 else package
    return f"{base}.{name}" if name else base


def _imports(module: str) -> tuple[set[str], set[str]]:
    """`(lowrank modules, top-level third-party names)` that `module` imports anywhere in its
    source (inside functions too), and the third-party names imported at module level."""
    tree = ast.parse(MODULES[module].read_text())
    internal: set[str] = set()
    external_top: set[str] = set()
    top_level = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node.level, node.module)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name in MODULES:
                internal.add(name)
            elif not name.startswith("lowrank") and id(node) in top_level:
                external_top.add(name.split(".")[0])
    internal.discard(module)
    return internal, external_top


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of nodes, or None (depth-first search)."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                return [*path[path.index(child) :], child]
            if child not in state and (found := visit(child)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _graph() -> dict[str, set[str]]:
    """Module → the lowrank modules it imports, leaving out a package's own `__init__` (which
    Python runs before any of its modules, so a child naming its parent is no cycle)."""
    graph = {}
    for module in MODULES:
        internal, _ = _imports(module)
        graph[module] = {m for m in internal if not module.startswith(m + ".")}
    return graph


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_modules():
    assert _cycle(_graph()) is None


def test_bounds_and_report_import_one_way():
    graph = _graph()
    assert "lowrank.bounds" in graph["lowrank.report"]
    assert not any(m.startswith("lowrank.report") for m in graph["lowrank.bounds"])


def _requirement_name(requirement: str) -> str:
    name = requirement.split(";")[0]
    for mark in "<>=!~[ ":
        name = name.split(mark)[0]
    return name.strip().lower().replace("-", "_")


def _dependencies() -> list[str]:
    """The `[project] dependencies` of pyproject.toml (a list of quoted strings)."""
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.M | re.S)
    assert block, "pyproject.toml has no [project] dependencies list"
    return re.findall(r'"([^"]+)"', block.group(1))


def test_runtime_dependencies_are_what_the_library_imports():
    declared = {_requirement_name(r) for r in _dependencies()}
    imported = set()
    for module in MODULES:
        imported |= _imports(module)[1]
    third_party = {name for name in imported if name not in sys.stdlib_module_names}
    assert third_party == declared

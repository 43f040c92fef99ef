"""The package's modules import only downward and use only each other's public names.

Every module of the installed ``nestrnn`` package (with ``nestrnn.tasks`` and ``nestrnn.plugins``,
which setuptools maps there from the top-level ``tasks/`` and ``plugins/`` folders) is parsed with
``ast``; nothing is imported. An import anywhere in a file counts, at module level or inside a
function: a lazy import hides a cycle from the interpreter, not from the reader.

``import a.b`` is an edge to ``a.b``; ``from a import b`` is an edge to ``a.b`` when that is a module
and to ``a`` otherwise. The parent packages Python imports on the way are not edges: every module
would otherwise depend on ``nestrnn/__init__.py``, which re-exports the public API. Modules imported
by a name computed at run time (plugins, by the registry) are not edges either.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import itertools
import pkgutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE_ROOTS = ("nestrnn", "nestrnn.tasks", "nestrnn.plugins")
"""The installed package's roots: ``nestrnn`` and the folders pyproject's package-dir maps into it."""

# Exceptions, each with its reason; an entry that no longer matches anything fails the tests below.

ALLOWED_CYCLE_EDGES: dict[tuple[str, str], str] = {}
"""Imports (importer, imported) left out of the cycle check; each must still close a cycle."""

ALLOWED_PRIVATE_USES: dict[tuple[str, str], str] = {}
"""Private names (user module, ``module._name``) taken from another module; each must still be."""


@dataclass(frozen=True)
class Use:
    """Module ``user`` names ``target`` (a module, or ``module._name``) on line ``line``."""

    user: str
    target: str
    line: int


def package_modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name, with its source file."""
    modules: dict[str, Path] = {}
    for root in PACKAGE_ROOTS:
        spec = importlib.util.find_spec(root)
        assert spec is not None and spec.submodule_search_locations, f"{root} is not installed"
        collect_package(root, Path(spec.submodule_search_locations[0]), modules)
    return modules


def collect_package(package: str, directory: Path, modules: dict[str, Path]) -> None:
    modules[package] = directory / "__init__.py"
    for info in pkgutil.iter_modules([str(directory)]):
        name = f"{package}.{info.name}"
        if info.ispkg:
            collect_package(name, directory / info.name, modules)
        elif (directory / f"{info.name}.py").is_file():  # not a compiled extension
            modules[name] = directory / f"{info.name}.py"


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


class ModuleReader:
    """The imports of one module of the package and the private names it takes from the others."""

    def __init__(self, module: str, modules: dict[str, Path]) -> None:
        self.module = module
        self.modules = modules
        path = modules[module]
        self.tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        self.package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        self.bound: dict[str, str] = {}  # local name -> the package module it is bound to

    def imports(self) -> Iterator[Use]:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in self.modules:
                        top = alias.name.partition(".")[0]
                        self.bound[alias.asname or top] = alias.name if alias.asname else top
                        yield Use(self.module, alias.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                base = self.base_of(node)
                for alias in node.names:
                    if f"{base}.{alias.name}" in self.modules:
                        self.bound[alias.asname or alias.name] = f"{base}.{alias.name}"
                        yield Use(self.module, f"{base}.{alias.name}", node.lineno)
                    elif base in self.modules:
                        yield Use(self.module, base, node.lineno)

    def private_uses(self) -> Iterator[Use]:
        """``from m import _x`` and ``m._x``, ``m`` another module of the package (after imports)."""
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom) and self.base_of(node) in self.modules:
                for alias in node.names:
                    if is_private(alias.name):
                        yield Use(self.module, f"{self.base_of(node)}.{alias.name}", node.lineno)
            elif isinstance(node, ast.Attribute) and is_private(node.attr):
                owner = self.module_named_by(node.value)
                if owner is not None and owner != self.module:
                    yield Use(self.module, f"{owner}.{node.attr}", node.lineno)

    def base_of(self, node: ast.ImportFrom) -> str:
        """The absolute name of the module a ``from ... import`` statement imports from."""
        if not node.level:
            return node.module or ""
        package = self.package
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        return f"{package}.{node.module}" if node.module else package

    def module_named_by(self, node: ast.expr) -> str | None:
        """The package module an expression like ``registry`` or ``nestrnn.ops.common`` names."""
        if isinstance(node, ast.Name):
            return self.bound.get(node.id)
        if isinstance(node, ast.Attribute):
            owner = self.module_named_by(node.value)
            if owner is not None and f"{owner}.{node.attr}" in self.modules:
                return f"{owner}.{node.attr}"
        return None


def read(modules: dict[str, Path]) -> tuple[list[Use], list[Use]]:
    """The imports between ``modules`` and the private names they take from each other."""
    imports: list[Use] = []
    private: list[Use] = []
    for module in sorted(modules):
        reader = ModuleReader(module, modules)
        imports += reader.imports()
        private += reader.private_uses()
    return imports, private


@functools.cache
def installed_package() -> tuple[dict[str, Path], list[Use], list[Use]]:
    modules = package_modules()
    return modules, *read(modules)


def graph_of(imports: list[Use]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for use in imports:
        if use.user != use.target:
            graph.setdefault(use.user, set()).add(use.target)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of ``graph`` with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = stack[stack.index(node) :]
            del stack[stack.index(node) :]
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def shortest_path(graph: dict[str, set[str]], start: str, goal: str) -> list[str] | None:
    """The modules on a shortest import path from ``start`` to ``goal`` (both included)."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(graph.get(node, ())):
                if successor == goal:
                    path = [goal, node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return path[::-1]
                if successor not in came_from and successor != start:
                    came_from[successor] = node
                    following.append(successor)
        frontier = following
    return None


def cycles_in(imports: list[Use], modules: dict[str, Path]) -> list[str]:
    """One shortest cycle through each group of modules importing each other, with file:line."""
    graph = graph_of(imports)
    described = []
    for component in strongly_connected(graph):
        cycle = shortest_path(graph, component[0], component[0])
        steps = []
        for user, target in itertools.pairwise(cycle):
            lines = sorted({u.line for u in imports if (u.user, u.target) == (user, target)})
            steps.append(f"    {user} -> {target}  ({modules[user]}:{', '.join(map(str, lines))})")
        described.append("\n".join(steps))
    return described


def test_every_module_of_the_package_is_read():
    modules, _, _ = installed_package()
    for expected in ("nestrnn.registry", "nestrnn.ops.nested_lstm.op", "nestrnn.tasks.base"):
        assert expected in modules
    assert all(path.is_file() for path in modules.values())


def test_the_reader_finds_lazy_cycles_and_private_names(tmp_path):
    sources = {
        "pkg": "",
        "pkg.low": "def later():\n    from pkg import high\n\n    return high._secret\n",
        "pkg.high": "import pkg.low as low\nfrom . import low as again\nfrom .low import _hidden\n",
        "pkg.top": "import pkg.high\n\nprint(pkg.high._secret, pkg.high.__name__)\n",
    }
    modules = {}
    for name, source in sources.items():
        path = tmp_path / "pkg" / ("__init__.py" if name == "pkg" else f"{name[4:]}.py")
        path.parent.mkdir(exist_ok=True)
        path.write_text(source)
        modules[name] = path
    imports, private = read(modules)
    assert {(u.user, u.target, u.line) for u in private} == {
        ("pkg.high", "pkg.low._hidden", 3),
        ("pkg.low", "pkg.high._secret", 4),
        ("pkg.top", "pkg.high._secret", 3),
    }
    (cycle,) = cycles_in(imports, modules)
    assert "pkg.high -> pkg.low" in cycle and "high.py:1, 2, 3)" in cycle
    assert "pkg.low -> pkg.high" in cycle and "low.py:2)" in cycle


def test_no_import_cycles():
    modules, imports, _ = installed_package()
    checked = [u for u in imports if (u.user, u.target) not in ALLOWED_CYCLE_EDGES]
    cycles = cycles_in(checked, modules)
    assert not cycles, (
        "import cycles in the package (a module must import only modules below it: move what both "
        "need into a module below them):\n" + "\n  and\n".join(cycles)
    )


def test_allowed_cycle_edges_still_close_a_cycle():
    _, imports, _ = installed_package()
    graph = graph_of(imports)
    stale = [
        f"{user} -> {target}"
        for user, target in ALLOWED_CYCLE_EDGES
        if target not in graph.get(user, ()) or shortest_path(graph, target, user) is None
    ]
    assert not stale, (
        f"no cycle through these any more; remove them from ALLOWED_CYCLE_EDGES: {stale}"
    )


def test_no_private_names_used_across_modules():
    modules, _, private = installed_package()
    found = sorted(
        f"    {u.user} uses {u.target}  ({modules[u.user]}:{u.line})"
        for u in private
        if (u.user, u.target) not in ALLOWED_PRIVATE_USES
    )
    assert not found, (
        "private names used by another module (make the name public, or move the code that needs "
        "it into its module):\n" + "\n".join(found)
    )


def test_allowed_private_uses_are_still_there():
    _, _, private = installed_package()
    stale = sorted(set(ALLOWED_PRIVATE_USES) - {(u.user, u.target) for u in private})
    assert not stale, f"no longer used; remove them from ALLOWED_PRIVATE_USES: {stale}"


# (importing package prefix, package prefix it must never import, why)
LAYERS = (
    ("nestrnn.memory", "nestrnn.ops.nested_lstm", "the plugin interface sits below the op"),
    ("nestrnn.ops.outer_lstm", "nestrnn.ops.nested_lstm", "the two paths share ops.common only"),
    ("nestrnn.ops.common", "nestrnn.ops.nested_lstm", "ops.common is below both paths"),
    ("nestrnn.ops.common", "nestrnn.ops.outer_lstm", "ops.common is below both paths"),
)


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_layers_import_only_what_is_below_them():
    modules, imports, _ = installed_package()
    found = sorted(
        f"    {u.user} imports {u.target}  ({modules[u.user]}:{u.line}): {why}"
        for u in imports
        for user, forbidden, why in LAYERS
        if _within(u.user, user) and _within(u.target, forbidden)
    )
    assert not found, "imports across layers:\n" + "\n".join(found)

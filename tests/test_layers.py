"""The core's imports flow one way (docs/architecture.md, "Layers"): no import cycle between modules of
`platform/alignlab` nor between its packages, no core module imports a `cli` module, argparse, or a package
built on top of the core (components, pipelines, the dashboard). Imports inside functions count: they hide a
cycle from the interpreter, not from a reader. Imports under `if TYPE_CHECKING:` do not (annotations only)."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "platform"
ABOVE_CORE = ("alignlab_components", "alignlab_pipelines", "alignlab_dashboard", "services")


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((CORE / "alignlab").rglob("*.py")):
        parts = list(path.relative_to(CORE).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module name `name` imports, at any depth of the file (functions included)."""
    found = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    tree = ast.parse(path.read_text(), str(path))
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
                 for child in node.body for n in ast.walk(child)}
    for node in ast.walk(tree):
        if id(node) in type_only:  # annotations only: never imported at run time
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return found


def _core_target(imported: str) -> str | None:
    """The core module an import names (`alignlab.data.shards.IMAGE_EXTENSIONS` -> `alignlab.data.shards`)."""
    while imported and imported not in MODULES:
        imported = imported.rpartition(".")[0]
    return imported or None


def _is_cli(module: str) -> bool:
    last = module.rsplit(".", 1)[-1]
    return last == "cli" or last.endswith("_cli")


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        targets = {_core_target(i) for i in _imports(name, path) if i.split(".")[0] == "alignlab"}
        graph[name] = {t for t in targets if t and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _package(module: str) -> str:
    """`alignlab.training.builders` -> `alignlab.training`; a top-level module stands for itself."""
    return ".".join(module.split(".")[:2])


def test_the_walk_sees_function_level_imports_and_cycles():
    graph = _graph()
    assert "alignlab.storage" in graph["alignlab.data.writer"] or "alignlab.storage.local" in graph["alignlab.data.writer"]
    assert any(t.startswith("alignlab.evaluate") for t in graph["alignlab.experiment"])  # imported in a function
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_between_modules():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles between core modules (move the shared piece down a layer): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_no_import_cycle_between_packages():
    """Library modules only: a `cli` module sits above every layer even when it lives in its package's folder
    (`data/cli.py` parses with the settings helper, which names config errors)."""
    packages: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        if _is_cli(module):
            continue
        packages.setdefault(_package(module), set()).update(
            _package(t) for t in targets if _package(t) != _package(module))
    cycles = _cycles(packages)
    assert not cycles, "import cycles between core packages: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_core_imports_no_cli_module_no_argparse_and_nothing_built_on_it():
    bad = []
    for name, path in MODULES.items():
        if _is_cli(name):
            continue
        for imported in sorted(_imports(name, path)):
            target = _core_target(imported) if imported.split(".")[0] == "alignlab" else None
            if (target and _is_cli(target)) or imported.split(".")[0] in ABOVE_CORE + ("argparse",):
                bad.append(f"{name} imports {imported}")
    assert not bad, "a library module imports a CLI module, argparse or a package above the core: " + "; ".join(bad)

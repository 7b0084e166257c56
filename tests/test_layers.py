"""The import graph under src/ against the layer order docs/ARCHITECTURE.md documents.

Each module belongs to the deepest layer entry naming it or a package
holding it; a module may import from its own layer and the layers below,
never from one above, and no chain of imports leads back to where it began.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
DOC = ROOT / "docs" / "ARCHITECTURE.md"


def _layers() -> list[list[str]]:
    match = re.search(r"```layers\n(.*?)```", DOC.read_text(), re.S)
    assert match, "docs/ARCHITECTURE.md has no ```layers block"
    lines = [line.split("#")[0].split() for line in match.group(1).splitlines()]
    return [names for names in lines if names]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in (SRC / "pyvdpa").rglob("*.py")}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pyvdpa"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if not base.startswith("pyvdpa"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {target for target in found if target in modules and target != name}


def _layer_of(name: str, layers: list[list[str]]) -> int:
    best, depth = -1, -1
    for index, entries in enumerate(layers):
        for entry in entries:
            if (name == entry or name.startswith(entry + ".")) and entry.count(".") > depth:
                best, depth = index, entry.count(".")
    return best


def test_every_module_has_a_layer() -> None:
    layers = _layers()
    missing = sorted(name for name in _modules() if _layer_of(name, layers) < 0)
    assert not missing, f"modules in no documented layer: {missing}"


def test_no_module_imports_a_higher_layer() -> None:
    layers = _layers()
    modules = _modules()
    violations = []
    for name, path in modules.items():
        own = _layer_of(name, layers)
        for target in _imports(name, path, modules):
            if _layer_of(target, layers) > own:
                violations.append(f"{name} (layer {own}) imports {target}")
    assert not violations, "\n".join(sorted(violations))


def test_no_import_cycle() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        # Tarjan's strongly connected components.
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"

"""The bench's modules import each other without a cycle (imports inside functions count) and import no private
name of another module; each of them imports on its own."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import liftavatar.bench

PACKAGE = "liftavatar.bench"


def bench_modules() -> dict[str, Path]:
    """Module name -> source file of the package and each of its modules."""
    root = Path(liftavatar.bench.__file__).parent
    modules = {PACKAGE: root / "__init__.py"}
    for info in pkgutil.iter_modules([str(root)]):
        modules[f"{PACKAGE}.{info.name}"] = root / f"{info.name}.py"
    return modules


def imports_of(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(module, names imported from it) for every import statement of the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names = [alias.name for alias in node.names]
            found.append((module, names))
            found += [(f"{module}.{n}", []) for n in names]  # `from package import module`
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {name: {m for m, _ in imports_of(name, path) if m in modules and m != name}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as the list of its nodes (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_every_bench_module_imports():
    modules = bench_modules()
    assert {f"{PACKAGE}.{m}" for m in ("config", "layout", "stages", "jobs", "runner", "summary", "html")} <= set(modules)
    for name in modules:
        importlib.import_module(name)
    assert set(liftavatar.bench.__all__) == {"BenchConfig", "demo_config", "full_config", "quick_config", "run_bench"}


def test_bench_modules_import_each_other_without_a_cycle():
    modules = bench_modules()
    graph = import_graph(modules)
    assert graph[f"{PACKAGE}.runner"] >= {f"{PACKAGE}.stages", f"{PACKAGE}.jobs"}  # the parser sees the imports
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_no_private_name_is_imported_across_bench_modules():
    modules = bench_modules()
    private = [(name, module, n) for name, path in modules.items() for module, names in imports_of(name, path)
               if module in modules for n in names if n.startswith("_")]
    assert not private, private

"""Dependencies point down the pipeline (DESIGN.md §4): no module imports a later stage, and none imports in a cycle.

Imports are read with ``ast`` from every module of the package, those inside functions too, so a late import
cannot hide a dependency that points the wrong way.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "liftavatar"

# The package's parts in pipeline order: a part may import its own modules and those of earlier parts only.
# `report` (pictures of captures and the machine a run used) sits low: the avatar trainer draws its validation
# sheets with it. The report of a run (tables, plots, the HTML page) is in `bench`.
ORDER = ("errors", "io", "capture", "fingerprint", "video", "face", "synth", "refs", "targets", "generator", "lift", "report",
         "avatar", "metrics", "bench", "cli")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, name: str) -> set[str]:
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {m for m in found if m == "liftavatar" or m.startswith("liftavatar.")}


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_the_order_names_every_part_of_the_package():
    parts = {p.stem for p in PACKAGE.iterdir() if (p.suffix == ".py" and p.stem != "__init__") or
             (p.is_dir() and (p / "__init__.py").is_file())}
    assert parts == set(ORDER), f"add new parts to ORDER in their pipeline place: {sorted(parts ^ set(ORDER))}"


def test_no_module_imports_a_later_stage():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        mine = _part(name)
        if mine is None:
            continue
        for imported in _imports(path, name):
            theirs = _part(imported)
            if theirs is not None and theirs in ORDER and ORDER.index(theirs) > ORDER.index(mine):
                wrong.append(f"{name} imports {imported}")
    assert not wrong, "imports that point up the pipeline:\n" + "\n".join(sorted(wrong))


def test_the_named_directions_hold():
    """The ones the architecture review asked for by name (implied by the order, spelled out so they read)."""
    modules = _modules()
    for name, path in modules.items():
        targets = {_part(m) for m in _imports(path, name)}
        if name.startswith("liftavatar.face"):
            assert "synth" not in targets, f"{name} imports the synthetic world"
        if name.startswith("liftavatar.generator"):
            assert not targets & {"report", "bench"}, f"{name} imports the report or the bench"


def test_no_import_cycles():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        # An import of `liftavatar.x.y` depends on the module itself; a package's __init__ is not followed.
        graph[name] = {m for m in _imports(path, name) if m in modules and m != name and m != "liftavatar"}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)

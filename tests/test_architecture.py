"""The layout holds: imports point one way (core, then io, then train, then the
operations and the CLI), no import cycle between the package's modules (imports inside
functions count), and no module grows past what a newcomer can read.

Read with the standard library's ``ast``: nothing is imported, so a cycle hidden in a
function body is found as surely as one at the top of a file.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "gct_surgery"
PACKAGE = "gct_surgery"
MAX_LINES = 450
# Which layer may import which: a module of a layer imports only from layers at or below it.
LAYERS = {"errors": 0, "core": 1, "io": 2, "train": 3, "top": 4, "cli": 5}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every package module that ``name`` imports, anywhere in the file."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from pkg import module`` imports that module; ``from mod import name`` imports mod
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # a name inside a module: the module itself
                t = t.rpartition(".")[0]
            if t.startswith(PACKAGE) and t != name:
                found.add(t)
    return found


def layer(name: str) -> int:
    parts = name.split(".")
    if len(parts) == 1:
        return LAYERS["top"]
    if parts[1] in LAYERS:
        return LAYERS[parts[1]]
    return LAYERS["top"]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = all_modules()
    known = set(modules)
    # The package facade (gct_surgery/__init__.py) re-exports lazily from every layer.
    return {n: imports_of(n, p, known) - {PACKAGE} for n, p in modules.items() if n != PACKAGE}


def test_no_import_cycles(graph):
    """Tarjan's strongly connected components: any component of two or more is a cycle."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_imports_point_one_way(graph):
    upward = [(a, b) for a, targets in graph.items() for b in targets
              if b != PACKAGE and layer(b) > layer(a)]
    assert not upward, f"imports against the layering (core < io < train < top < cli): {upward}"


def test_the_checker_finds_a_cycle_inside_a_function(tmp_path):
    pkg = tmp_path / "gct_surgery"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("from .b import x\n")
    (pkg / "core" / "b.py").write_text("def f():\n    from . import a\n")
    known = {"gct_surgery", "gct_surgery.core", "gct_surgery.core.a", "gct_surgery.core.b"}
    global PACKAGE_DIR
    saved, PACKAGE_DIR = PACKAGE_DIR, pkg
    try:
        assert imports_of("gct_surgery.core.b", pkg / "core" / "b.py", known) == {"gct_surgery.core.a"}
        assert imports_of("gct_surgery.core.a", pkg / "core" / "a.py", known) == {"gct_surgery.core.b"}
    finally:
        PACKAGE_DIR = saved


def test_no_module_is_too_long():
    long = {str(p.relative_to(PACKAGE_DIR)): n for p in PACKAGE_DIR.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"

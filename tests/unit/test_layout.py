"""The package's shape, kept: no import cycle between ingestd's modules, not
even one only the type checker sees (a cycle is two modules that cannot be
understood, changed or tested apart); no function over 80 lines; no module
over 500 lines but the settings model; no test-support module over 400."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ingestd"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The ingestd modules `path` imports, at run time or for the type checker."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ingestd"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("ingestd"))
    return {m for m in out if m in known}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_modules() -> None:
    known = _modules()
    # A package's __init__ importing its own modules is how a package is made.
    graph = {
        m: {i for i in _imports(p, known) if not (p.name == "__init__.py" and i.startswith(m))}
        for m, p in known.items()
    }
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_one() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_functions_and_modules_stay_readable() -> None:
    long_functions = []
    long_modules = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        lines = source.count("\n")
        if lines > 500 and path.name != "config.py":
            long_modules.append(f"{path.relative_to(PACKAGE.parent)}: {lines}")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > 80:
                    long_functions.append(f"{path.name}:{node.name}: {length}")
    support = PACKAGE.parent / "tests" / "support"
    long_support = [
        f"{p.name}: {n}"
        for p in sorted(support.glob("*.py"))
        if (n := p.read_text().count("\n")) > 400
    ]
    assert (long_functions, long_modules, long_support) == ([], [], [])

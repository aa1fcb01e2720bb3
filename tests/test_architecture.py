"""The house stays in order: the import graph of ``spectral_mup`` has no cycle (every
import counts, a function's lazy import included), and no module or function outgrows the
limits of docs/architecture.md."""

from __future__ import annotations

import ast
from pathlib import Path

import spectral_mup

SRC = Path(spectral_mup.__file__).parent
ROOT = "spectral_mup"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of the package that ``name`` imports anywhere in its file, with the
    packages Python initializes on the way (a subpackage's ``__init__`` that does not
    contain ``name``; the root package's face is left out: every module is under it)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in modules else base)
        for target in targets:
            if not (target == ROOT or target.startswith(ROOT + ".")):
                continue
            while target not in modules:  # an attribute of a module, e.g. a.b.NAME
                target = target.rpartition(".")[0]
            found.add(target)
            parent = target.rpartition(".")[0]
            while parent and parent != ROOT:
                if not (name == parent or name.startswith(parent + ".")):
                    found.add(parent)
                parent = parent.rpartition(".")[0]
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_and_package_imports() -> None:
    graph = import_graph()
    assert "spectral_mup.config" in graph["spectral_mup.train.setup"]
    # a lazy import inside a function counts (cli imports its commands' modules lazily)
    assert "spectral_mup.train" in graph["spectral_mup.cli"]


def test_no_import_cycle() -> None:
    found = cycles(import_graph())
    assert found == [], "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def _function_lengths() -> list[tuple[int, str]]:
    out = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                out.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    return sorted(out, reverse=True)


def test_modules_and_functions_stay_small() -> None:
    """No module over 600 lines; no function over 100 lines but the CLI's argparse
    builder; at most three over 80."""
    long_modules = {
        name: n
        for name, path in _modules().items()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > 600
    }
    assert long_modules == {}
    lengths = _function_lengths()
    over_100 = [f for n, f in lengths if n > 100 and f != "spectral_mup.cli._parser"]
    assert over_100 == []
    over_80 = [f"{f} ({n})" for n, f in lengths if n > 80 and f != "spectral_mup.cli._parser"]
    assert len(over_80) <= 3, over_80

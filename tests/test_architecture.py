"""The package's layers, read from its own imports: no import circle anywhere, and no import from
a lower layer into a higher one. Every ``import`` statement counts, at module level and inside
functions alike (a function-level import is a dependency all the same).

Layers, lowest first (a module may import its own layer and any layer below it):

1. ``sap_fast._runtime``: running the model, data forms, checks, file writes;
2. ``sap_fast.backends`` (and the compiled ``sap_fast._C``): which kernel serves each stage, and
   the call;
3. the SAP core: the top-level modules of ``sap_fast`` and its public face (``__init__``);
4. ``sap_fast.experiments`` and ``sap_fast.baselines``: applications of the core;
5. ``sap_fast.cli`` (and ``python -m sap_fast``): the command line, over everything.
"""
from __future__ import annotations

import ast
import os
from typing import Dict, List, Set

import pytest

import sap_fast

PACKAGE_DIR = os.path.dirname(sap_fast.__file__)
LAYERS = {"_runtime": 1, "backends": 2, "_C": 2, "experiments": 4, "baselines": 4, "cli": 5, "__main__": 5}
CORE = 3


def modules_of(root: str, package: str) -> Dict[str, str]:
    """Dotted module name → file, for every .py file under ``root`` (the package ``package``)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        rel = os.path.relpath(folder, root)
        parts = [package] + ([] if rel == "." else rel.split(os.sep))
        for f in sorted(files):
            if f.endswith(".py"):
                name = ".".join(parts if f == "__init__.py" else parts + [f[:-3]])
                out[name] = os.path.join(folder, f)
    return out


def imports_of(name: str, path: str, known: Set[str], package: str) -> Set[str]:
    """The modules of the package that ``name`` imports anywhere in its file."""
    is_package = os.path.basename(path) == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[:len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target.startswith(package) and target != name:
                found.add(target)
    return found


def graph_of(root: str, package: str) -> Dict[str, Set[str]]:
    mods = modules_of(root, package)
    known = set(mods) | {f"{package}._C"}  # the compiled extension: part of the backends layer
    return {m: imports_of(m, p, known, package) for m, p in mods.items()}


def layer_of(module: str, package: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], CORE) if len(parts) > 1 else CORE


def circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                out.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def upward(graph: Dict[str, Set[str]], package: str) -> List[str]:
    return sorted(f"{src} (layer {layer_of(src, package)}) imports {dst} (layer {layer_of(dst, package)})"
                  for src, targets in graph.items() for dst in targets
                  if layer_of(dst, package) > layer_of(src, package))


GRAPH = graph_of(PACKAGE_DIR, "sap_fast")


def test_the_walk_sees_the_whole_package():
    assert "sap_fast.backends.gram" in GRAPH and "sap_fast.cli.correct" in GRAPH
    assert "sap_fast.backends.gram" in GRAPH["sap_fast.accumulate"]
    # a function-level import counts too
    assert any(GRAPH.values())


def test_no_import_circle():
    assert circles(GRAPH) == []


def test_imports_flow_down_the_layers():
    assert upward(GRAPH, "sap_fast") == []


def test_the_core_never_reaches_the_applications():
    core = [m for m in GRAPH if layer_of(m, "sap_fast") == CORE]
    assert {"sap_fast.sweep", "sap_fast.project", "sap_fast.targets"} <= set(core)
    for m in core:
        assert not any(layer_of(t, "sap_fast") > CORE for t in GRAPH[m]), m


@pytest.fixture
def toy(tmp_path):
    """A package with a circle (a → b → a, b's import inside a function) and an upward import
    (backends → cli): what the two checks above must catch."""
    root = tmp_path / "toy"
    (root / "backends").mkdir(parents=True)
    (root / "cli").mkdir()
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("from . import b\n")
    (root / "b.py").write_text("def f():\n    from .a import thing\n")
    (root / "backends" / "__init__.py").write_text("")
    (root / "backends" / "k.py").write_text("from ..cli.main import run\n")
    (root / "cli" / "__init__.py").write_text("")
    (root / "cli" / "main.py").write_text("from ..backends import k\nimport toy.a\n")
    return graph_of(str(root), "toy")


def test_the_checks_catch_a_circle_and_an_upward_import(toy):
    assert toy["toy.b"] == {"toy.a"}
    assert circles(toy) == [["toy.a", "toy.b"], ["toy.backends.k", "toy.cli.main"]]
    assert upward(toy, "toy") == ["toy.backends.k (layer 2) imports toy.cli.main (layer 5)"]

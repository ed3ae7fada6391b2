"""Every public module says what it exports: at least 90% of the public modules (no
``_``-prefixed component in the dotted name) declare ``__all__``, and every name in any module's
``__all__`` exists in that module.

The ratio covers every public module of the package; the second check covers every module,
``_runtime`` and the other private ones included.
"""
from __future__ import annotations

import ast
import importlib
from typing import Dict, List, Tuple

import pytest

from test_architecture import PACKAGE_DIR, modules_of

MIN_DECLARED = 0.9
RATIO_EXCLUDES: Tuple[str, ...] = ()


def is_public(module: str) -> bool:
    return not any(part.startswith("_") for part in module.split("."))


def bound_names(tree: ast.Module) -> set:
    """The names a module binds at its top level (``if``/``try`` blocks included)."""
    names = set()

    def visit(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                visit(getattr(node, "finalbody", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return names


def declared_all(tree: ast.Module):
    """The names of the module's ``__all__`` (a literal list or tuple), or None."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__"
                                                for t in node.targets):
            return [ast.literal_eval(e) for e in node.value.elts]
    return None


def declared(modules: Dict[str, str]) -> Tuple[List[str], List[str], Dict[str, List[str]]]:
    """(modules with ``__all__``, modules without, module → names in ``__all__`` it lacks), for
    ``modules`` (dotted name → file), read from the source (a module is imported only where its
    ``__all__`` is built at import time)."""
    with_all, without, missing = [], [], {}
    for name, path in sorted(modules.items()):
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        try:
            names, bound = declared_all(tree), bound_names(tree)
        except ValueError:  # an __all__ built at import time (``*METHODS``): read it from the module
            module = importlib.import_module(name)
            names, bound = module.__all__, set(vars(module))
        if names is None:
            without.append(name)
            continue
        with_all.append(name)
        absent = [n for n in names if n not in bound]
        if absent:
            missing[name] = absent
    return with_all, without, missing


def counted(modules: Dict[str, str], excludes=RATIO_EXCLUDES) -> Dict[str, str]:
    return {m: p for m, p in modules.items() if is_public(m)
            and not any(m == e or m.startswith(e + ".") for e in excludes)}


ALL_MODULES = modules_of(PACKAGE_DIR, "sap_fast")


def test_public_modules_declare_all():
    public = counted(ALL_MODULES)
    assert {"sap_fast", "sap_fast.project", "sap_fast.targets", "sap_fast.cli.correct"} <= set(public)
    with_all, without, _ = declared(public)
    assert len(with_all) / len(public) >= MIN_DECLARED, f"no __all__ in {without}"


def test_every_name_in_all_exists():
    _, _, missing = declared(ALL_MODULES)
    assert missing == {}


def test_the_checks_catch_a_missing_name_and_missing_declarations(tmp_path):
    root = tmp_path / "toypkg"
    (root / "_inner").mkdir(parents=True)
    (root / "__init__.py").write_text("__all__ = ['thing']\nthing = 1\n")
    (root / "a.py").write_text("import os.path as p\n__all__ = ['f', 'gone', 'p', 'T']\ndef f():\n    pass\n"
                              "try:\n    T = 1\nexcept ImportError:\n    T = None\n")
    (root / "b.py").write_text("x = 1\n")
    (root / "_inner" / "__init__.py").write_text("")
    (root / "_inner" / "c.py").write_text("y = 2\n")
    modules = modules_of(str(root), "toypkg")
    public = counted(modules, excludes=())
    assert sorted(public) == ["toypkg", "toypkg.a", "toypkg.b"]  # the _-prefixed package is private
    with_all, without, missing = declared(public)
    assert with_all == ["toypkg", "toypkg.a"] and without == ["toypkg.b"]
    assert missing == {"toypkg.a": ["gone"]}
    assert len(with_all) / len(public) < MIN_DECLARED
    assert declared(modules)[1] == ["toypkg._inner", "toypkg._inner.c", "toypkg.b"]


@pytest.mark.parametrize("module", ["sap_fast.project", "sap_fast.targets", "sap_fast.sweep"])
def test_core_modules_export_their_entry_points(module):
    names = importlib.import_module(module).__all__
    want = {"sap_fast.project": {"Projector", "correct", "resolve_solver", "build_projector"},
            "sap_fast.targets": {"Target", "select_targets", "CONV_TYPES"},
            "sap_fast.sweep": {"sweep", "SweepResult", "DEFAULT_ALPHAS"}}[module]
    assert want <= set(names)

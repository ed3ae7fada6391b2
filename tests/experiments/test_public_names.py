"""Every module of sap_fast.experiments declares its public names in ``__all__``: each name there
exists, and every public function, class and constant the module defines is there or is named
below as module-internal."""
import ast
import importlib
import os

import pytest

import sap_fast

FOLDER = os.path.join(os.path.dirname(sap_fast.__file__), "experiments")
MODULES = sorted(f[:-3] for f in os.listdir(FOLDER) if f.endswith(".py") and not f.startswith("_"))
INTERNAL = {"clothing1m": {"CONFUSED", "CHUNK", "PHASES", "TILES"}, "digits": {"CACHE_VERSION"}}


def defined_names(path):
    names = set()
    for node in ast.parse(open(path, encoding="utf-8").read()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return {n for n in names if not n.startswith("_")}


def test_the_modules_are_the_applications():
    assert MODULES == ["clothing1m", "compare", "demo", "digits", "metrics", "noise"]


@pytest.mark.parametrize("name", MODULES)
def test_all_lists_the_public_names(name):
    module = importlib.import_module(f"sap_fast.experiments.{name}")
    assert len(set(module.__all__)) == len(module.__all__)
    assert all(hasattr(module, n) for n in module.__all__)
    assert defined_names(os.path.join(FOLDER, f"{name}.py")) - INTERNAL.get(name, set()) == set(module.__all__)

"""Layers point one way: factory <- loaders <- models <- cli.  Every import of every
module is read from its source (including imports inside functions), so a cycle hidden
in a function body fails here too."""

import ast

import pytest

from conftest import ROOT

LAYERS = ["factory", "loaders", "models", "cli"]


def imports_of(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0], node.lineno


@pytest.mark.parametrize("layer", LAYERS)
def test_no_module_imports_a_layer_above_its_own(layer):
    above = set(LAYERS[LAYERS.index(layer) + 1:])
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files
    bad = [f"{f.relative_to(ROOT)}:{line} imports {name}" for f in files for name, line in imports_of(f)
           if name in above]
    assert not bad, bad


def test_the_walk_sees_imports_inside_functions(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from models.training.train import fit\n    import cli.main\n")
    assert {n for n, _ in imports_of(p)} == {"models", "cli"}

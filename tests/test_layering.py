"""Imports run one way (README "Layout"): recipes, labelapp -> modules, datamodules -> core.

Every import counts, also the ones inside functions (a lazy import is still a dependency).
"""

import ast
import sys
from pathlib import Path

from tests.conftest import ROOT

STDLIB = set(sys.stdlib_module_names)
OURS = ("core", "modules", "datamodules", "recipes", "labelapp")
MODEL_LIBRARIES = ("transformers", "peft", "bitsandbytes")


def imports(path: Path) -> set[str]:
    """Absolute module names a file imports, at any depth; `from x import y` adds x and x.y (y may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (write it absolute, so this test sees it)"
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def tops(path: Path) -> set[str]:
    return {name.split(".")[0] for name in imports(path)}


def files(*folders: str) -> list[Path]:
    found = [path for folder in folders for path in sorted((ROOT / folder).rglob("*.py"))]
    assert found, folders
    return found


def test_core_imports_none_of_the_layers_above():
    for path in files("core"):
        above = tops(path) & {"modules", "datamodules", "recipes", "labelapp"}
        assert not above, f"{path.relative_to(ROOT)} imports {above}: core is below them all"


def test_modules_and_datamodules_stand_side_by_side():
    for path in files("modules"):
        assert "datamodules" not in tops(path), f"{path.relative_to(ROOT)} imports datamodules"
    for path in files("datamodules"):
        assert "modules" not in tops(path), f"{path.relative_to(ROOT)} imports modules"


def test_nothing_below_recipes_imports_recipes():
    for path in files("core", "modules", "datamodules", "labelapp"):
        assert "recipes" not in tops(path), f"{path.relative_to(ROOT)} imports recipes"


def test_pure_math_imports_only_torch_and_stdlib():
    for path in [*files("core/losses"), ROOT / "core" / "ops.py"]:
        for name in imports(path):
            top = name.split(".")[0]
            ok = top in STDLIB or top == "torch" or name.startswith(("core.ops", "core.losses"))
            assert ok, f"{path.relative_to(ROOT)} imports {name}"


def test_only_models_py_imports_model_libraries():
    # transformers' logging utilities (recipes/common.py quiets them) and LR schedules (core/optim.py) are no
    # model classes
    no_models = ("transformers.utils", "transformers.optimization")
    for path in files(*OURS):
        if path == ROOT / "core" / "models.py":
            continue
        for name in imports(path):
            if name.split(".")[0] in MODEL_LIBRARIES and not name.startswith(no_models):
                raise AssertionError(f"{path.relative_to(ROOT)} imports {name}: only core/models.py loads models")


def test_no_import_cycle():
    # one node per file of ours, an edge per import of another (lazy ones too): the graph has no cycle
    name_of = {path: ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
               for path in files(*OURS)}
    known = set(name_of.values())
    graph = {name_of[path]: (imports(path) & known) - {name_of[path]} for path in name_of}
    done, path = set(), []

    def visit(node):
        if node in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(node):] + [node])}")
        if node not in done:
            path.append(node)
            for dep in sorted(graph[node]):
                visit(dep)
            path.pop()
            done.add(node)

    for node in sorted(graph):
        visit(node)


def test_the_rules_see_lazy_imports(tmp_path):
    lazy = tmp_path / "lazy.py"
    lazy.write_text("def f():\n    from datamodules.synthetic import oracle_reward\n    import peft\n")
    assert {"datamodules", "peft"} <= tops(lazy)

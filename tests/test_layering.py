"""Imports run one way (DESIGN.md section 2): recipes -> modules, datamodules -> losses, ops, models, generation."""

import ast
import sys
from pathlib import Path

from tests.conftest import ROOT

STDLIB = set(sys.stdlib_module_names)


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_pure_math_imports_only_torch_and_stdlib():
    for path in [*(ROOT / "modules" / "losses").glob("*.py"), ROOT / "modules" / "ops.py"]:
        for name in imports(path):
            top = name.split(".")[0]
            assert top in STDLIB or top == "torch" or name.startswith("modules.ops") or name.startswith(
                "modules.losses"
            ), f"{path.name} imports {name}"


def test_nothing_below_recipes_imports_recipes():
    for folder in ("modules", "datamodules"):
        for path in (ROOT / folder).rglob("*.py"):
            assert not any(n.split(".")[0] == "recipes" for n in imports(path)), path


def test_only_models_py_imports_model_libraries():
    for folder in ("modules", "datamodules", "recipes"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "models.py":
                continue
            for name in imports(path):
                top = name.split(".")[0]
                assert top not in ("peft", "bitsandbytes"), f"{path} imports {name}"

"""Product code holds no dead names: every module-level function, class and constant has a user outside tests/.

A helper that only tests call belongs in tests/; one nobody calls is deleted. A name counts as used when it
appears anywhere else in product code or benchmarks (code, strings or docs), which errs towards keeping.
"""
from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTSIDE_THE_PRODUCT = {"tests", ".venv", "venv", "build", "runs", "data"}


def python_files() -> list[Path]:
    return [path for path in ROOT.rglob("*.py")
            if not OUTSIDE_THE_PRODUCT & set(path.relative_to(ROOT).parts) and not path.name.startswith(".")]


def defined_names(tree: ast.Module) -> list[str]:
    """Module-level functions, classes and constants; a decorator registers its target, so those are used."""
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.decorator_list:
            names.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names += [target.id for target in targets if isinstance(target, ast.Name)]
    return [name for name in names if not (name.startswith("__") and name.endswith("__"))]


def test_every_product_name_is_used_outside_tests():
    files = {path: path.read_text() for path in python_files()}
    words = Counter(word for text in files.values() for word in re.findall(r"\w+", text))
    dead = []
    for path, text in files.items():
        for name in defined_names(ast.parse(text)):
            if words[name] <= 1:  # its definition only
                dead.append(f"{path.relative_to(ROOT)}:{name}")
    assert len(files) > 50 and not dead, f"used by tests only, or by nothing: {dead}"


def test_every_declared_pytest_marker_is_used():
    import tomllib

    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    declared = [marker.split(":")[0].strip() for marker in options.get("markers", [])]
    used = set(re.findall(r"pytest\.mark\.(\w+)", "".join(path.read_text() for path in (ROOT / "tests").glob("*.py"))))
    assert "usefixtures" in used and not set(declared) - used, f"declared, never used: {set(declared) - used}"

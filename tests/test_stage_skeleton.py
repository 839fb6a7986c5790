"""The stages share one frame (stages/skeleton.py): each stage function keeps only what is its own, and what the
terminal shows and the log keeps is said once, through one helper, not printed and logged by hand."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE_FUNCTIONS = {"stages/teacher.py": "train_teacher", "stages/dp_statistics.py": "capture_statistics",
                   "stages/synthesis.py": "synthesize", "stages/student.py": "train_student"}
MAX_LINES = 60


def test_each_stage_function_is_at_most_sixty_lines():
    lengths = {}
    for path, name in STAGE_FUNCTIONS.items():
        tree = ast.parse((ROOT / path).read_text(), path)
        function = next(node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == name)
        lengths[name] = function.end_lineno - function.lineno + 1
    assert {name: length for name, length in lengths.items() if length > MAX_LINES} == {}, lengths


def _call(statement: ast.stmt, attribute: str | None = None) -> ast.Call | None:
    """The call that ``statement`` is, if it calls ``print`` (no ``attribute``) or a logger's ``attribute``."""
    call = statement.value if isinstance(statement, ast.Expr) else None
    if not isinstance(call, ast.Call):
        return None
    if attribute is None:
        return call if isinstance(call.func, ast.Name) and call.func.id == "print" else None
    named = isinstance(call.func, ast.Attribute) and call.func.attr == attribute
    return call if named and "logger" in ast.unparse(call.func.value) else None


def print_then_log(source: str, where: str) -> list[str]:
    """'where:line' of every ``print(...)`` directly followed by a ``logger.info(...)``: the pair ``say`` replaces."""
    found = []
    for node in ast.walk(ast.parse(source, where)):
        for body in (getattr(node, name, None) for name in ("body", "orelse", "finalbody")):
            if not isinstance(body, list):
                continue
            for first, second in zip(body, body[1:]):
                if _call(first) is not None and _call(second, "info") is not None:
                    found.append(f"{where}:{first.lineno}")
    return found


def test_the_pair_finder_finds_a_pair():
    assert print_then_log("if ok:\n    print(line)\n    logger.info(line)\n", "x.py") == ["x.py:2"]
    assert print_then_log("print(line)\nlogger.warning(line)\nsay(logger, line)\n", "x.py") == []


def test_no_stage_script_or_other_module_prints_and_logs_the_same_line_by_hand():
    paths = [path for path in sorted(ROOT.rglob("*.py")) if path.relative_to(ROOT).parts[0] not in (".venv", "tests")
             and not any(part.startswith(".") for part in path.relative_to(ROOT).parts)]
    names = {str(path.relative_to(ROOT)) for path in paths}
    assert {"stages/teacher.py", "train_dp.py", "evaluation/release.py"} <= names
    assert [place for path in paths
            for place in print_then_log(path.read_text(), str(path.relative_to(ROOT)))] == []

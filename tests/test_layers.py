"""The house has floors: every product module imports only from its own floor or below, with no cycles.

Read from the source (every import statement, function-local ones included), so a lazy import
cannot hide an upward dependency. ``privacy/`` in particular may use nothing of the project but the
ground floor: the guarantee can be read, tested and audited without the rest of the code.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOORS = [  # bottom up; a module's floor is its top-level package, or the top-level script itself
    {"common"},
    {"privacy"},
    {"registry", "models", "sources"},
    {"synthesizer", "training"},
    {"evaluation", "audit"},
    {"stages"},
]
NOT_PRODUCT = {"tests", "benchmarks"}


def product_modules() -> dict[str, Path]:
    """``dotted.name -> file`` of every product module (scripts at the top count as the top floor)."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[0] in NOT_PRODUCT or parts[0].startswith("."):
            continue
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def floor(module: str) -> int:
    top = module.split(".")[0]
    return next((index for index, names in enumerate(FLOORS) if top in names), len(FLOORS))


def imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports (``from package import module`` resolves to the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    modules = product_modules()
    return {name: imports(path, modules) - {name} for name, path in modules.items()}


def test_every_module_has_a_floor_and_imports_only_downwards():
    edges = graph()
    packages = {name.split(".")[0] for name in edges if "." in name or (ROOT / name).is_dir()}
    assert packages <= set().union(*FLOORS) | {"scripts"}, "a new package needs its floor in FLOORS"
    upward = sorted(f"{name} -> {target}" for name, targets in edges.items() for target in targets
                    if floor(target) > floor(name))
    assert upward == []


def test_privacy_uses_only_the_ground_floor():
    edges = graph()
    assert sorted(f"{name} -> {target}" for name, targets in edges.items() if name.startswith("privacy")
                  for target in targets if floor(target) > 1) == []
    assert all(floor(target) <= 1 for name, targets in edges.items() if name.startswith("privacy")
               for target in targets)


def test_there_are_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(edges[name]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_contract_catches_an_upward_import(tmp_path):
    """The checker has teeth: a privacy module importing the registry is reported."""
    modules = product_modules()
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import registry\n    from stages.teacher import train_teacher\n")
    assert imports(bad, modules) == {"registry", "stages.teacher"}
    assert floor("privacy.bad") < floor("registry") < floor("stages.teacher")

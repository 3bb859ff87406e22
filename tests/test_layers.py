"""The house has three floors: pipeline/ and schemas/ (the foundation) import nothing above
them, stages/ (the domain) imports no orchestration, flows/ may import everything. Read from
every `import` statement of every module, lazy imports inside functions included."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOOR = {"schemas": 0, "pipeline": 0, "stages": 1, "flows": 2}


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FLOOR))
def test_no_import_points_up_a_floor(package):
    wrong = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for top in imports(path) & set(FLOOR):
            if FLOOR[top] > FLOOR[package]:
                wrong.append(f"{path.relative_to(ROOT)} imports {top}")
    assert not wrong, wrong

"""The layout's rules, checked on the source: the lab is test infrastructure, so no module of
the production package (tasks/) imports it; dodo.py, tests and benchmarks may."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_no_module_of_tasks_imports_the_lab():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p)
                                                 if m == "lab" or m.startswith("lab."))
                 for p in sorted((ROOT / "tasks").rglob("*.py"))}
    assert {k: v for k, v in offenders.items() if v} == {}

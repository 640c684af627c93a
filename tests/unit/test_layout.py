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


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def tasks_graph() -> dict[str, set[str]]:
    """tasks module -> the tasks modules it imports (anywhere in it; `from tasks import x`
    counts as importing tasks.x)."""
    paths = sorted((ROOT / "tasks").rglob("*.py"))
    names = {module_name(p) for p in paths}
    graph: dict[str, set[str]] = {}
    for p in paths:
        tree = ast.parse(p.read_text(), filename=str(p))
        deps: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module in names:
                    deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names
                         if f"{node.module}.{a.name}" in names}
        me = module_name(p)
        graph[me] = {d for d in deps if d != me and not me.startswith(d + ".")}
    return graph


def test_no_import_cycle_in_tasks():
    graph = tasks_graph()
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for dep in sorted(graph.get(node, ())):
            if dep in path:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif len(path) < 12:
                visit(dep, [*path, dep])

    for start in sorted(graph):
        visit(start, [start])
    assert cycles == []


def test_no_module_of_tasks_is_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / "tasks").rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}


def test_lab_modules_are_sized_to_one_job_without_an_import_cycle():
    """lab/driver.py's parts (base, nodes, network, access, engine, proc) import each other in
    one direction only, and none is over 400 lines."""
    paths = sorted((ROOT / "lab").glob("*.py"))
    names = {module_name(p) for p in paths}
    graph = {module_name(p): {m for m in imported_modules(p) if m in names} for p in paths}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(d == goal or (d not in seen and reaches(d, goal, seen | {d}))
                   for d in graph[start])

    assert [m for m in sorted(graph) if reaches(m, m, {m})] == []
    long = {str(p.relative_to(ROOT)): n for p in paths
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}

"""The import graph of the project, read with `ast`: no circles, and every arrow points down the house.

    scripts -> demo -> benchmarks, training -> runs -> techniques (tgate, tstitch, deep_cache, caches), evaluation
            -> models (dit, ldm), data -> the sampling core (diffusion)

A package may import its own modules and any package on a lower floor, never one on its floor or above
(so techniques do not import each other, models import no technique, the core imports nothing of ours).
"""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import CONFIGS

ROOT = CONFIGS.parent
FLOORS = {
    "diffusion": 0,
    "data": 1, "dit": 1, "ldm": 1,
    "tgate": 2, "tstitch": 2, "deep_cache": 2, "caches": 2, "evaluation": 2,
    "runs": 3,
    "training": 4, "benchmarks": 4,
    "demo": 5,
    "scripts": 6,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The project modules `path` imports (module level or inside functions), relative ones resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t.split(".")[0] in FLOORS}
    return found


def _graph() -> dict[str, set[str]]:
    files = [p for top in FLOORS for p in (ROOT / top).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        # `from pkg import name` names a module when pkg/name.py exists, else an attribute of pkg
        graph[name] = {t for t in _imports(path) if t in modules and t != name}
    return graph


def test_the_project_has_modules_in_every_floor():
    graph = _graph()
    assert {m.split(".")[0] for m in graph} == set(FLOORS)
    assert "runs.run" in graph and "diffusion.sampler" in graph and "training.train" in graph


def test_every_import_points_down_the_house():
    against = []
    for module, targets in _graph().items():
        here = module.split(".")[0]
        for target in targets:
            there = target.split(".")[0]
            if there != here and FLOORS[there] >= FLOORS[here]:
                against.append(f"{module} -> {target}")
    assert against == []


def test_the_core_imports_no_job_training_model_or_technique_module():
    core = {m: t for m, t in _graph().items() if m.split(".")[0] == "diffusion"}
    assert core and all(target.startswith("diffusion") for targets in core.values() for target in targets)


def test_no_import_circles():
    graph = _graph()
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert circles == []

"""The package's import arrows follow the data flow: stages are siblings over shared layers.

squeeze, recover and evaluate import only what lies below them (data, loaders, models,
distributed, kernels, the artifact layer, training helpers), never each other; pipeline, bench, the
CLI and its config registry sit on top; nothing imports in a cycle. Every import counts, function-local ones included.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = ("engine.squeeze", "engine.recover", "engine.evaluate")
TOP = ("engine.pipeline", "engine.merge", "engine.bench", "engine.studies", "engine.cli",
       "engine.config_store")  # config_store: the CLI's Hydra registry; studies: several pipelines


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    files = [p for root in ("engine", "kernels") for p in (REPO / root).rglob("*.py")]
    return {_module_name(p): p for p in files}


def import_graph() -> dict[str, set[str]]:
    """module -> the engine/kernels modules it imports (at any depth of the file)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                candidates = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            else:
                continue
            for candidate in candidates:
                if candidate in modules:
                    targets.add(candidate)
                    if isinstance(node, ast.ImportFrom) and candidate != node.module:
                        break  # `from pkg import submodule`: the submodule is the dependency
        graph[name] = targets - {name}
    return graph


def _layer(module: str) -> str:
    for prefix in STAGES + TOP:
        if module == prefix or module.startswith(prefix + "."):
            return prefix
    return "lower"


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for source, targets in graph.items():
        here = _layer(source)
        for target in targets:
            there = _layer(target)
            if here in TOP or there == "lower" or there == here:
                continue
            if here in STAGES and there in STAGES:
                bad.append(f"stage-to-stage: {source} -> {target}")
            elif there in TOP:
                bad.append(f"{'stage' if here in STAGES else 'lower layer'} imports the top: {source} -> {target}")
            else:
                bad.append(f"lower layer imports a stage: {source} -> {target}")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_stages_import_only_lower_layers_and_nothing_imports_the_top():
    assert layering_violations(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_checks_catch_what_they_guard_against():
    graph = {"engine.squeeze.probe": {"engine.evaluate.student"},
             "engine.recover.stage": {"engine.bench.measure", "engine.artifacts.layout"},
             "engine.artifacts.layout": {"engine.recover.plan"},
             "engine.evaluate.relabel": {"engine.evaluate.student"},
             "engine.evaluate.student": {"engine.evaluate.relabel"},
             "engine.pipeline": {"engine.squeeze.stage"}}
    assert layering_violations(graph) == [
        "lower layer imports a stage: engine.artifacts.layout -> engine.recover.plan",
        "stage imports the top: engine.recover.stage -> engine.bench.measure",
        "stage-to-stage: engine.squeeze.probe -> engine.evaluate.student",
    ]
    assert cycles(graph) == [["engine.evaluate.relabel", "engine.evaluate.student"]]


def test_graph_sees_function_local_imports():
    # engine.loaders.settings imports engine.loaders inside functions only
    assert "engine.loaders" in import_graph()["engine.loaders.settings"]

"""The package import graph: no module cycle (function-level imports count too: a lazy import is still a
dependency), and the layering rules of docs/architecture.md:

- model packages (herd.text, herd.vision, herd.speech, herd.adapters) import no other part of herd;
- herd.parallel (generic FSDP, TP, CP, PP, AC, compile) imports no task, trainer, runtime, plan, adapter,
  model, data or command module: it applies a plan and names no model class;
- herd.task (the contract) is a leaf; herd.losses needs only herd.data.records;
- herd.plans imports models and herd.parallel, no task, trainer or data;
- herd.data imports no training core (config, tasks, trainer, runtime, parallel, plans).
(argparse lives in herd.commands only: tests/herd/test_commands.py.)
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"herd": "herd", "text": "herd.text", "vision": "herd.vision", "speech": "herd.speech",
                "adapters": "herd.adapters", "data": "herd.data"}  # fmt: skip


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [PACKAGE_DIRS[rel.parts[0]], *rel.with_suffix("").parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for top in PACKAGE_DIRS for p in sorted((ROOT / top).rglob("*.py"))}


def imported(name: str) -> set[str]:
    """herd modules `name` imports anywhere in its file (resolved to the longest existing module)."""
    path = MODULES[name]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    out = set()
    for n in names:
        while n and n not in MODULES:
            n = n.rpartition(".")[0]
        if n and n != name:
            out.add(n)
    return out


GRAPH = {name: imported(name) for name in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_module_graph_has_no_cycle():
    assert len(MODULES) > 80
    assert cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


MODEL_PACKAGES = ("herd.text", "herd.vision", "herd.speech", "herd.adapters")
RULES = [
    # (modules the rule is about, what they may not import, why)
    (MODEL_PACKAGES, lambda d: not under(d, *MODEL_PACKAGES), "model code imports no other part of herd"),
    (("herd.parallel",), lambda d: not under(d, "herd.parallel", "herd.config"),
     "herd.parallel applies plans: it imports no task, trainer, runtime, plan, model, adapter or data module"),
    (("herd.task", "herd.task_registry"), lambda d: d != "herd.task_registry",
     "the task contract is a leaf (its torch-free registry aside)"),
    (("herd.losses",), lambda d: d != "herd.data.records", "the shared losses need only herd.data.records"),
    (("herd.plans",), lambda d: under(d, "herd.task", "herd.tasks", "herd.trainer", "herd.runtime", "herd.data",
                                      "herd.commands"), "plans import models and herd.parallel only"),
    (("herd.data",), lambda d: under(d, "herd.config", "herd.task", "herd.tasks", "herd.trainer", "herd.runtime",
                                     "herd.parallel", "herd.plans", "herd.commands"),
     "data jobs import no training core"),
]  # fmt: skip


@pytest.mark.parametrize("subjects,forbidden,why", RULES, ids=[r[2] for r in RULES])
def test_layering_rule(subjects, forbidden, why):
    bad = [(m, sorted(d for d in GRAPH[m] if forbidden(d))) for m in sorted(GRAPH) if under(m, *subjects)]
    bad = [(m, deps) for m, deps in bad if deps]
    assert not bad, f"{why}: {bad}"

"""The module graph stays one-way: no import cycles, and each tier imports only what it may."""

import ast

from shared.settings import REPO_ROOT

PACKAGES = ("shared", "web", "worker", "training", "client", "benchmarks", "tools")
# What each package's modules may import from the others (besides their own package).
ALLOWED = {
    "shared": set(),
    "web": {"shared"},
    "worker": {"shared"},
    "client": {"shared"},
    "training": {"shared"},
    "tools": {"shared", "training"},
    "benchmarks": {"shared", "tools", "training"},
}


def module_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (found by reading the source, not running it)."""
    names = {}
    for package in PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")
            names[name] = path
    graph = {}
    for name, path in names.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in names and t != name}
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                on_stack.discard(w)
                component.append(w)
            on_stack.discard(v)
            if component:
                found.append(sorted([v, *component]))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(module_graph()) == []


def test_each_tier_imports_only_what_it_may():
    wrong = [
        f"{m} imports {d}"
        for m, deps in module_graph().items()
        for d in deps
        if d.split(".")[0] != m.split(".")[0] and d.split(".")[0] not in ALLOWED[m.split(".")[0]]
    ]
    assert wrong == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_worker_s_forked_processes_and_training_import_the_model_framework():
    importers = {m for m, deps in module_graph().items() if "shared.predictor" in deps}
    assert {m.split(".")[0] for m in importers} <= {"worker", "training", "benchmarks"}
    assert "worker.__main__" not in importers and not any(m.startswith("web") for m in importers)

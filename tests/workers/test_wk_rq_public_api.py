"""``ml_backend/`` and ``workers/`` use RQ through its public API only, so an RQ upgrade cannot break them silently.

Parsed, not run: no module imports an underscore name from ``rq`` (or an RQ Redis key constant, ``*_KEY(S)``), and no
attribute ``obj._name`` is read, written or defined (as a method) where ``_name`` is private anywhere in RQ: a
private method of one of its classes or a private attribute its own code uses. The list of RQ's private names is read
from the installed ``rq`` package, so a name RQ adds later is covered too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import rq

REPO = Path(__file__).parents[2]
CHECKED = sorted([*(REPO / "ml_backend").glob("*.py"), *(REPO / "workers").glob("*.py")])


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def rq_private_names() -> set[str]:
    """Every ``_name`` that RQ's own code defines as a function/method or uses as an attribute."""
    names: set[str] = set()
    for path in Path(rq.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                names.add(node.attr)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _private(node.name):
                names.add(node.name)
    return names


def uses_of_rq_internals(path: Path, private: set[str], root: Path = REPO) -> list[str]:
    """``file:line: what`` for each use of an RQ internal in the module at ``path``, in line order."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "rq":
            found += [(node.lineno, f"from {node.module} import {alias.name}") for alias in node.names
                      if _private(alias.name) or alias.name.endswith(("_KEY", "_KEYS"))]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, f"import {alias.name}") for alias in node.names
                      if alias.name.split(".")[0] == "rq" and any(_private(p) for p in alias.name.split("."))]
        elif isinstance(node, ast.Attribute) and node.attr in private:
            found.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.ClassDef):  # a method overriding (or shadowing) one of RQ's private ones
            found += [(item.lineno, f"def {item.name}") for item in node.body
                      if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and item.name in private]
    rel = path.relative_to(root)
    return [f"{rel}:{line}: {what}" for line, what in sorted(found)]


def test_rq_private_names_are_found() -> None:
    # What worker.py and queue.py used before they kept to RQ's public API: if these vanish from the list, the
    # scan (or RQ's layout) changed and this test must be looked at again.
    assert {"_result", "_status", "_handle_success", "_finalize_success", "_finalize_failure",
            "_success_callback_name"} <= rq_private_names()


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: str(p.relative_to(REPO)))
def test_module_uses_only_public_rq(path: Path) -> None:
    assert uses_of_rq_internals(path, rq_private_names()) == []


def test_the_scan_catches_what_the_old_worker_did(tmp_path: Path) -> None:
    bad = tmp_path / "old_worker.py"
    bad.write_text(
        "from rq.worker_registration import WORKERS_BY_QUEUE_KEY\n"
        "from rq.utils import _private_helper\n"
        "def finish(job, value):\n"
        "    job._result = value\n"
        "    job._handle_success(0)\n"
        "class W:\n"
        "    def _finalize_success(self): ...\n"
    )
    found = [line.split(": ", 1)[1] for line in uses_of_rq_internals(bad, rq_private_names(), root=tmp_path)]
    assert found == ["from rq.worker_registration import WORKERS_BY_QUEUE_KEY", "from rq.utils import _private_helper",
                     "._result", "._handle_success", "def _finalize_success"]

"""No import circles hidden by function-level imports (issue 15, the house).

The rule: when a module of agentd/ imports another one of agentd/ inside a function (a deferred import, for
speed or to break a circle), that other module must not import the first one back, directly or through
others, at any level. Such a pair is a circle that works only because of when things run: placement's
engine.py imported whatif.py inside `place` while whatif.py imported engine.py (now planner.py sits above
both), and config.py imported clientconfig.py while clientconfig.py deferred to config.py (now both read
agentd/defaults.py). Imports under `if TYPE_CHECKING:` do not count: they never run.

Checked statically over the whole package, and (slow tier) by importing every module on its own, with no
other agentd module loaded before it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def module_name(root: Path, f: Path) -> str:
    parts = list(f.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, package: str) -> dict[str, list[tuple[str, bool, int]]]:
    """module -> [(imported module, deferred (inside a function), line)], the package's own modules only."""
    files = {module_name(root, f): f for f in sorted((root / package).rglob("*.py"))}

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, list[tuple[str, bool, int]]] = {}
    for me, f in files.items():
        out: list[tuple[str, bool, int]] = []

        def visit(node: ast.AST, deferred: bool, me: str = me, out: list = out) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue  # typing only: never imported at run time
                inner = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                targets: list[str] = []
                if isinstance(child, ast.Import):
                    targets = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                    targets = [f"{child.module}.{a.name}" for a in child.names]
                for t in targets:
                    m = resolve(t)
                    if m is not None and m != me:
                        out.append((m, inner, child.lineno))
                visit(child, inner)

        visit(ast.parse(f.read_text(), filename=str(f)), False)
        graph[me] = out
    return graph


def hidden_circles(graph: dict[str, list[tuple[str, bool, int]]]) -> list[str]:
    def reaches(start: str, goal: str) -> bool:
        seen, todo = {start}, [start]
        while todo:
            for nxt, _, _ in graph.get(todo.pop(), []):
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    return sorted(f"{a}:{line} imports {b} inside a function, and {b} imports {a} back"
                  for a, edges in graph.items() for b, deferred, line in edges if deferred and reaches(b, a))


def test_no_function_level_import_closes_a_circle():
    assert hidden_circles(import_graph(ROOT, "agentd")) == []


def test_the_check_catches_a_hidden_circle(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("from pkg.mid import helper\n")
    (pkg / "mid.py").write_text("def helper():\n    from pkg.high import run\n    return run\n")
    (pkg / "high.py").write_text("import pkg.low\n\ndef run():\n    pass\n")
    (pkg / "typed.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import low\n"
                                  "def f():\n    from pkg.low import helper\n")
    assert hidden_circles(import_graph(tmp_path, "pkg")) == [
        "pkg.mid:2 imports pkg.high inside a function, and pkg.high imports pkg.mid back"]


FRESH_IMPORTS = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for m in [m for m in sys.modules if m == "agentd" or m.startswith("agentd.")]:
        del sys.modules[m]
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
print("\\n".join(failed))
"""


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    """Each module of agentd/ imports with no other agentd module loaded first (third-party ones stay cached:
    one interpreter, about 20 s of CPU, instead of 170 interpreters)."""
    names = [n for n in import_graph(ROOT, "agentd") if not n.endswith("__main__")]
    out = subprocess.run([sys.executable, "-c", FRESH_IMPORTS, *names], capture_output=True, text=True,
                         cwd=ROOT, check=True, timeout=600)
    assert out.stdout.strip() == ""

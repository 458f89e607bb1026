"""No test module imports another test module.

Importing a test module from another one runs its module-level code (skips, marks, fixtures) a second time under
another name, pulls its fixtures in by name (so ruff flags them as unused and someone removes them), and ties the
two files together: a helper removed from one broke the collection of the other in CI. Shared fixtures live in
tests/conftest.py, shared helpers in agentd/testing/ (or tests/scenarios/, which holds no tests).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _test_files() -> list[Path]:
    return sorted([*ROOT.glob("tests/**/*.py"), *ROOT.glob("plugins/*/tests/**/*.py")])


def _is_test_module(dotted: str) -> bool:
    """`tests.test_x`, `test_x`, `.test_x`, `plugins.vllm.tests.test_x`: one of this repository's test modules
    (`aiohttp.test_utils` is a library's helper, not ours)."""
    parts = dotted.split(".")
    ours = len(parts) == 1 or parts[0] in ("", "tests", "plugins")
    return ours and parts[-1].startswith("test_")


def cross_test_imports(source: str, filename: str = "<test>") -> list[str]:
    """The test modules that `source` imports, at any depth in the file (function-local imports too)."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if _is_test_module(a.name)]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            if node.module and _is_test_module(node.module):
                found.append(base)
            else:  # `from tests import test_x`, `from . import test_x`
                found += [f"{base}.{a.name}" for a in node.names if _is_test_module(f"{base}.{a.name}")]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and _is_test_module(node.args[0].value):
            found.append(node.args[0].value)
    return found


def test_no_test_module_imports_another():
    offenders = {}
    for path in _test_files():
        names = cross_test_imports(path.read_text(), str(path))
        if names:
            offenders[str(path.relative_to(ROOT))] = names
    assert not offenders, (
        "test modules import other test modules (move shared fixtures to tests/conftest.py and helpers to "
        f"agentd/testing/): {offenders}")


@pytest.mark.parametrize("source", [
    "from tests.test_upgrade import wait_for",
    "import tests.test_coordinator",
    "import tests.test_coordinator as tc",
    "from tests import test_control_api",
    "from .test_runtime_supervisor import make",
    "from . import test_x",
    "from plugins.vllm.tests.test_placement import plugins",
    "def f():\n    from tests.test_upgrade import running\n",
    "import importlib\nm = importlib.import_module('tests.test_upgrade')",
])
def test_the_gate_sees_every_way_of_importing_a_test_module(source):
    assert cross_test_imports(source)


@pytest.mark.parametrize("source", [
    "from tests.conftest import run_cli",
    "from tests.scenarios.build import host",
    "from agentd.testing.localcluster import wait_for",
    "import pytest",
    "from agentd.testing import coordinator_world",
    "from aiohttp.test_utils import TestServer",
])
def test_helpers_and_the_conftest_are_not_test_modules(source):
    assert cross_test_imports(source) == []

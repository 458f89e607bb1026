"""Every hook in hookspecs.py is documented in the plugin guide."""

import inspect
from pathlib import Path

from agentd.plugins import hookspecs

DOCS = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def hook_names() -> list[str]:
    return [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
            if name.startswith("agentd_")]


def test_every_hookspec_is_documented():
    text = DOCS.read_text()
    names = hook_names()
    assert "agentd_runtime" in names
    missing = [n for n in names if f"`{n}" not in text]
    assert missing == [], f"hooks missing from docs/plugins.md: {missing}"


def test_every_hookspec_has_a_docstring():
    assert [n for n in hook_names() if not inspect.getdoc(getattr(hookspecs, n))] == []

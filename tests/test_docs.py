"""Every hook in hookspecs.py is documented in the plugin guide, with its real signature."""

import inspect
import re
from pathlib import Path

from agentd.plugins import hookspecs

DOCS = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def hook_names() -> list[str]:
    return [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
            if name.startswith("agentd_")]


def typed_signature(name: str) -> str:
    """`agentd_x(a: T, b: U) -> R` as hookspecs.py declares it (annotations are the source text)."""
    sig = inspect.signature(getattr(hookspecs, name))
    args = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"{name}({args}) -> {sig.return_annotation}"


def reference_block(text: str) -> list[str]:
    """The `def` lines of the guide's hook reference (the python block under "## Hook reference"), one
    per hook, continuation lines joined."""
    section = text.split("## Hook reference", 1)[1]
    block = section.split("```python", 1)[1].split("```", 1)[0]
    joined = re.sub(r",\n\s+", ", ", block)
    lines = [line.split("  #", 1)[0] for line in joined.splitlines() if line.startswith("def ")]
    return [line[len("def "):].rstrip().removesuffix(": ...") for line in lines]


def test_every_hookspec_is_documented():
    text = DOCS.read_text()
    names = hook_names()
    assert "agentd_runtime" in names
    missing = [n for n in names if f"`{n}" not in text]
    assert missing == [], f"hooks missing from docs/plugins.md: {missing}"


def test_every_hookspec_has_a_docstring():
    assert [n for n in hook_names() if not inspect.getdoc(getattr(hookspecs, n))] == []


def test_the_hook_reference_gives_each_real_typed_signature():
    documented = reference_block(DOCS.read_text())
    real = [typed_signature(n) for n in hook_names()]
    assert sorted(documented) == sorted(real)


def test_each_hook_section_names_the_real_arguments_in_order():
    text = DOCS.read_text()
    for name in hook_names():
        params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        assert f"#### `{name}({params})`" in text, name


def test_the_signature_check_sees_a_change():
    # A renamed argument or a changed type no longer matches what typed_signature renders.
    real = typed_signature("agentd_estimate")
    assert real.startswith("agentd_estimate(runtime: str, model: ModelInfo, spec: DeploymentSpec, shape: Shape)")
    assert reference_block("## Hook reference\n```python\ndef agentd_estimate(runtime: str,\n"
                           "        shape: Shape) -> None: ...\n```\n") == \
        ["agentd_estimate(runtime: str, shape: Shape) -> None"]

"""How placement writes sizes and GPU lists in messages: stable, short, human."""

from __future__ import annotations

from agentd.plugins.api import gib, index_list  # noqa: F401 (moved to the plugin API)
from agentd.types import MiB


def mib(n: float) -> str:
    return f"{n / MiB:.0f} MiB"


def plural(n: int, singular: str, plural_form: str | None = None) -> str:
    return singular if n == 1 else (plural_form or singular + "s")

"""How placement writes sizes and GPU lists in messages: stable, short, human."""

from __future__ import annotations

from collections.abc import Iterable

from agentd.types import GiB, MiB


def gib(n: float) -> str:
    """Bytes as GiB with one decimal ("72.0 GiB"): the unit every reason uses, so texts compare."""
    return f"{n / GiB:.1f} GiB"


def mib(n: float) -> str:
    return f"{n / MiB:.0f} MiB"


def index_list(indices: Iterable[int]) -> str:
    """GPU indices as ranges: (0, 1, 2, 3, 6) -> "0-3,6"."""
    out: list[str] = []
    items = sorted(set(indices))
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(out)


def plural(n: int, singular: str, plural_form: str | None = None) -> str:
    return singular if n == 1 else (plural_form or singular + "s")

"""Simulated inventories: a host-inventory JSON file (DESIGN.md §5) standing in for real GPUs.

CI has no GPU, and the demo and multi-agent tests run several "hosts" on one
machine, so each agent can be told to report the GPUs a file declares. Every
simulated GPU and the host itself carry `simulated=True`, so no output can
pass a simulation off as hardware.

The file is read again at every refresh: a test can edit it to make an
external process appear on a GPU, and the agent reports the change like a
real one. Host facts the file leaves out (cpu_count, memory) come from the
real machine; CPU feature flags (`cpu_features`) only from the file, so a
simulated host has the CPU it declares, whatever runs the simulation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agentd.errors import InvalidInput
from agentd.types import HostInventory

HOST_FACT_KEYS = ("cpu_count", "memory_total", "memory_available", "load_average")


def _field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def load_simulated(path: Path, *, default_name: str = "") -> tuple[HostInventory, frozenset[str]]:
    """The file's host, and which top-level keys it set; raises InvalidInput naming file and field.

    `default_name` is used when the file has no "name", so a file can describe
    GPUs only and take the agent's node name.
    """
    where = str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise InvalidInput("simulated inventory file does not exist", where=where) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read simulated inventory: {exc}", where=where) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"not valid JSON: {exc.msg}", where=f"{where}:{exc.lineno}:{exc.colno}") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"expected a JSON object (one host inventory), got {type(data).__name__}", where=where)
    if "hosts" in data and "gpus" not in data:
        raise InvalidInput("this is a cluster file; a simulated inventory is one host "
                           '(one element of "hosts")', where=where)
    if "name" not in data and default_name:
        data = {**data, "name": default_name}
    try:
        host = HostInventory.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"field {_field_path(err['loc'])}: {msg}")
        raise InvalidInput("invalid simulated inventory: " + "; ".join(problems), where=where) from None
    return host, frozenset(data)


def mark_simulated(host: HostInventory) -> HostInventory:
    """Labels the host and each GPU as simulated, with GPUs in index order."""
    gpus = tuple(g.model_copy(update={"simulated": True}) for g in sorted(host.gpus, key=lambda g: g.index))
    return host.model_copy(update={"simulated": True, "gpus": gpus})

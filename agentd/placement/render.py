"""The plan as JSON, in the shape `agentd plan --json` and the API print."""

from __future__ import annotations

from typing import Any

from agentd.types import Plan


def plan_json(plan: Plan) -> dict[str, Any]:
    """Plan.model_dump, minus per-part fields that do not apply (cpu_layers outside llamabox, empty splits)."""
    data = plan.model_dump(mode="json")
    for replica in data["replicas"]:
        for part in replica["parts"]:
            if part.get("cpu_layers") is None:
                part.pop("cpu_layers", None)
            if not part.get("layer_split"):
                part.pop("layer_split", None)
    return data

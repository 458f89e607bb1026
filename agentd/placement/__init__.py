"""The placement engine: pure functions from (cluster, model, deployment) to a Plan or a diagnosis.

No I/O here (tests/test_layering.py): the coordinator and `agentd plan`
pass a frozen cluster snapshot and the plugin manager in. See
docs/placement.md for the memory formulas, candidate order and scoring.
"""

from agentd.placement.constraints import (
    Constraint,
    MinFreeFraction,
    MinLayersOnMain,
    PipelineStages,
    QuantGroupAlignment,
    Rejection,
    TensorParallelDivisibility,
)
from agentd.placement.demand import LayerDemand, ShardDemand
from agentd.placement.layout import LaunchParams, Layout, PartLayout
from agentd.placement.planner import Placer, decision, place
from agentd.placement.render import plan_json
from agentd.placement.shapes import LayerSplit, ShapeLimits, Sharded
from agentd.placement.snapshot import GpuView, HostView, Snapshot

__all__ = [
    "Constraint",
    "GpuView",
    "HostView",
    "LaunchParams",
    "LayerDemand",
    "LayerSplit",
    "Layout",
    "MinFreeFraction",
    "MinLayersOnMain",
    "PartLayout",
    "PipelineStages",
    "Placer",
    "QuantGroupAlignment",
    "Rejection",
    "ShapeLimits",
    "ShardDemand",
    "Sharded",
    "Snapshot",
    "TensorParallelDivisibility",
    "decision",
    "place",
    "plan_json",
]

"""place(): from a frozen cluster snapshot, a model and a deployment spec to a Plan.

The top of the placement core: the search (engine.py) places the replicas; when it cannot, whatif.py explains
why and what would fit. Both sit below this module, so neither imports the other back (engine.py never
imports whatif.py; tests/test_import_cycles.py).

Pure: no I/O, no clocks, no randomness; the same input gives the same plan.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from agentd.logs import fields
from agentd.placement.engine import attempt, prepare, replica_plan
from agentd.placement.whatif import diagnose
from agentd.types import Assignment, ClusterInventory, DeploymentSpec, ModelInfo, Plan, ReplicaPlan

log = logging.getLogger("agentd.placement")


def place(
    cluster: ClusterInventory,
    model: ModelInfo,
    spec: DeploymentSpec,
    existing: Sequence[Assignment | ReplicaPlan] = (),
    *,
    plugins: Any,
) -> Plan:
    """Place every replica of `spec`, or explain why not (Plan.placed is False, diagnosis set).

    `plugins` is the PluginManager (or its hook relay). `existing` are the
    assignments already running or committed (their Part.memory is booked);
    leave out the ones this call replaces. Raises InvalidInput for a runtime
    that does not exist or does not serve the model's format, PluginError
    when a plugin misbehaves; an unplaceable deployment is a Plan, not an error.
    """
    plan = _plan(plugins, cluster, model, spec, existing)
    log.info(decision(spec, plan), extra=fields(deployment=spec.name, runtime=spec.runtime, placed=plan.placed,
                                                replicas=len(plan.replicas)))
    return plan


def _plan(plugins: Any, cluster: ClusterInventory, model: ModelInfo, spec: DeploymentSpec,
          existing: Sequence[Assignment | ReplicaPlan]) -> Plan:
    """The work of `place`, in a frame of its own: every temporary (snapshots, filter caches) is
    freed on return, before a caller that paused the cyclic collector (the coordinator:
    agentd/coordinator.py, collector_paused) resumes it, so it never walks them."""
    req = prepare(plugins, model, spec)
    outcome = attempt(req, cluster, existing)
    if outcome.placed:
        whys = outcome.whys + [""] * (len(outcome.layouts) - len(outcome.whys))
        return Plan(placed=True, runtime=spec.runtime,
                    replicas=tuple(replica_plan(req, lo, why) for lo, why in zip(outcome.layouts, whys, strict=True)))
    return Plan(placed=False, runtime=spec.runtime, diagnosis=diagnose(req, cluster, existing, outcome))


class Placer:
    """`place` bound to a plugin manager: the (cluster, model, spec, existing) -> Plan the coordinator calls."""

    def __init__(self, plugins: Any):
        self.plugins = plugins

    def __call__(self, cluster: ClusterInventory, model: ModelInfo, spec: DeploymentSpec,
                 existing: Sequence[Assignment | ReplicaPlan] = ()) -> Plan:
        return place(cluster, model, spec, existing, plugins=self.plugins)


def describe_replica(rp: ReplicaPlan) -> str:
    parts = []
    for p in rp.parts:
        gpus = ",".join(map(str, p.gpus))
        text = f"{p.role} {p.host} GPU{'s' if len(p.gpus) != 1 else ''} {gpus} ({p.layers} layers"
        if p.cpu_layers:
            text += f", {p.cpu_layers} on CPU"
        parts.append(text + ")")
    shape = []
    if rp.tensor_parallel > 1 or rp.pipeline_parallel > 1:
        shape.append(f"TP={rp.tensor_parallel} PP={rp.pipeline_parallel}")
    return " ".join([*shape, "; ".join(parts)])


def decision(spec: DeploymentSpec, plan: Plan) -> str:
    """The one sentence a placement decision logs and returns."""
    if not plan.placed:
        return plan.diagnosis.message if plan.diagnosis else f"{spec.name} could not be placed"
    if not plan.replicas:
        return f"placed {spec.name} ({plan.runtime}): no replicas requested"
    body = " | ".join(f"replica {i}: {describe_replica(rp)}" for i, rp in enumerate(plan.replicas))
    return f"placed {spec.name} ({plan.runtime}): {body}"

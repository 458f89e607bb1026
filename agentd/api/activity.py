"""The /v1/ proxy's counters in reports (issue 21): idle clocks for idle unload, per-replica queues for
replicas by load (agentd/autoscale.py). Both directions of the ModelActivity message, in one place."""

from __future__ import annotations

from collections.abc import Sequence

from agentd.autoscale import DeploymentActivity, ReplicaReading
from agentd.v1 import control_pb2 as pb


def activity_to_pb(report: dict[str, DeploymentActivity]) -> list[pb.ModelActivity]:
    """An agent's proxy counters for its report (`Activity.report`)."""
    return [pb.ModelActivity(deployment=name, idle_seconds=min(a.idle_seconds, 1e9), in_flight=a.in_flight,
                             held=a.held,
                             replicas=[pb.ReplicaLoad(instance_id=iid, outstanding=r.outstanding, running=r.running,
                                                      waiting=r.waiting, capacity=r.capacity)
                                       for iid, r in sorted(a.replicas.items())])
            for name, a in sorted(report.items())]


def activity_from_pb(rows: Sequence[pb.ModelActivity]) -> dict[str, DeploymentActivity]:
    """The leader's side of `activity_to_pb`, bounded (a report is a host's word, not a trusted input)."""
    return {a.deployment: DeploymentActivity(
                idle_seconds=max(0.0, a.idle_seconds), in_flight=a.in_flight, held=a.held,
                replicas={r.instance_id: ReplicaReading(outstanding=r.outstanding, running=r.running,
                                                        waiting=r.waiting, capacity=r.capacity)
                          for r in a.replicas[:1000]})
            for a in rows[:10000]}

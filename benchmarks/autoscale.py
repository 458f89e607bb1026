"""The leader's cost of replicas by load: CPU time of one autoscale pass (Coordinator._autoscale, run every
tick), with many autoscaled deployments and many hosts' proxy reports.

    .venv/bin/python benchmarks/autoscale.py [--deployments 1000] [--hosts 2048] [--per-host 8] [--ticks 20]

No processes, no placement: the replicated state is built directly (DEPLOYMENTS deployments of 2 replicas,
each scaled by load between 1 and 4), every host reports activity for PER_HOST of them, and the load is
between the hysteresis lines so each pass decides "steady" and commits nothing. Prints the CPU time per pass
(time.process_time, median and spread over TICKS passes) and the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time

from agentd.autoscale import DeploymentActivity, ReplicaReading
from agentd.cluster.state import ClusterState, deploy_command
from agentd.coordinator import Coordinator
from agentd.types import Assignment, DeploymentSpec, HostInventory, Part, PartEndpoint, ReplicaPlan
from agentd.version import STATE_FORMAT


class _Raft:
    term = 1
    is_leader = True
    members: dict = {}

    async def propose(self, command: bytes, timeout: float = 0.0):
        raise AssertionError("a steady load commits nothing")


def build(deployments: int, hosts: int, per_host: int, seed: int = 1) -> Coordinator:
    rng = random.Random(seed)
    state = ClusterState()
    state.cluster_format = STATE_FORMAT
    names = [f"h{i}" for i in range(hosts)]
    for d in range(deployments):
        spec = DeploymentSpec(name=f"d{d}", model="/m.gguf", runtime="llamabox", replicas=2, min_replicas=1,
                              max_replicas=4, target_queue=2.0)
        assignments = []
        for r in range(2):
            h = names[(2 * d + r) % hosts]
            assignments.append(Assignment(
                deployment=spec.name, replica=r, term=1, model=spec.model, runtime=spec.runtime,
                plan=ReplicaPlan(parts=(Part(host=h, role="main"),)),
                endpoints=(PartEndpoint(host=h, address="127.0.0.1", port=20000 + 2 * d + r),)))
        state.apply(d + 1, 1, deploy_command(spec, assignments))
    now = [1000.0]
    coord = Coordinator(state=state, consensus=_Raft(), place=lambda *a: None, inspect=lambda p: None,
                        validate_runtime=lambda r: None, port_range=(20000, 60000), node_down_grace=10.0,
                        clock=lambda: now[0])
    coord.became_leader()
    for h in names:
        coord.on_report(HostInventory(name=h, cpu_count=8, memory_total=1 << 34, memory_available=1 << 33), [])
    for h in names:
        acts = {}
        for d in rng.sample(range(deployments), min(per_host, deployments)):
            # 3 requests per replica-pair across the cluster: 1.5 per replica, between 1 and 2: steady.
            acts[f"d{d}"] = DeploymentActivity(in_flight=0, replicas={
                f"d{d}-r0-g1": ReplicaReading(outstanding=0, running=2), f"d{d}-r1-g1": ReplicaReading(running=1)})
        coord.on_activity(h, acts)
    return coord


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--deployments", type=int, default=1000)
    ap.add_argument("--hosts", type=int, default=2048)
    ap.add_argument("--per-host", type=int, default=8)
    ap.add_argument("--ticks", type=int, default=20)
    args = ap.parse_args()
    coord = build(args.deployments, args.hosts, args.per_host)
    samples = []

    async def run() -> None:
        for _ in range(args.ticks):
            t0 = time.process_time()
            decisions = await coord._autoscale()
            samples.append(time.process_time() - t0)
            assert not decisions, decisions[:3]

    asyncio.run(run())
    ms = sorted(s * 1000 for s in samples)
    print(f"{args.deployments} autoscaled deployments, {args.hosts} hosts reporting {args.per_host} each: "
          f"CPU per autoscale pass median {statistics.median(ms):.1f} ms (min {ms[0]:.1f}, max {ms[-1]:.1f}, "
          f"{args.ticks} passes); load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

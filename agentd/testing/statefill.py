"""A replicated state of any size, built through `apply` as a cluster would: for backup tests and benchmarks."""

from __future__ import annotations

import random

from agentd.cluster.state import ClusterState, deploy_command, key_add_command, node_command, secret_init_command
from agentd.security import apikeys
from agentd.types import Assignment, DeploymentSpec, Part, PartEndpoint, ReplicaPlan


def fill_state(state: ClusterState, deployments: int, *, hosts: int = 16, keys: int = 8,
               seed: int = 1) -> ClusterState:
    """`deployments` one-replica deployments spread over `hosts` hosts, `keys` API keys of as many tenants,
    and the cluster secret, each applied as one log entry (term 1)."""
    rng = random.Random(seed)
    index = 0

    def apply(command: bytes) -> None:
        nonlocal index
        index += 1
        result = state.apply(index, 1, command)
        if not result.ok:
            raise AssertionError(f"entry {index} refused: {result.message}")

    apply(secret_init_command("s" * 48))
    for h in range(hosts):
        apply(node_command(f"host-{h}", "up", f"10.0.0.{h}:7070"))
    for k in range(keys):
        _, record = apikeys.new_api_key(tenant=f"tenant-{k}", now=1.0e9, random_bytes=rng.randbytes,
                                        name=f"key {k}")
        apply(key_add_command(record))
    for d in range(deployments):
        name = f"model-{d}"
        host = f"host-{d % hosts}"
        spec = DeploymentSpec(name=name, model=f"/models/{name}.gguf", runtime="llamabox", replicas=1,
                              tenant=f"tenant-{d % max(keys, 1)}")
        plan = ReplicaPlan(parts=(Part(host=host, gpus=(d % 8,), role="main", layers=32),))
        a = Assignment(deployment=name, replica=0, generation=1, term=1, model=spec.model, runtime="llamabox",
                       plan=plan, endpoints=(PartEndpoint(host=host, address=f"10.0.0.{d % hosts}",
                                                          port=40000 + d % 1000),))
        apply(deploy_command(spec, [a]))
    return state

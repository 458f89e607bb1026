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


# One deployment "m" of one part, for tests of the state machine: a spec and an assignment of it.


def spec(name: str = "m", replicas: int = 1) -> DeploymentSpec:
    return DeploymentSpec(name=name, model="/models/m.gguf", runtime="llamabox", replicas=replicas)


def assignment(name: str = "m", replica: int = 0, term: int = 1, host: str = "a", generation: int = 1) -> Assignment:
    plan = ReplicaPlan(parts=(Part(host=host, gpus=(0,), role="main", layers=4),))
    return Assignment(deployment=name, replica=replica, generation=generation, term=term, model="/models/m.gguf",
                      runtime="llamabox", plan=plan,
                      endpoints=(PartEndpoint(host=host, address="127.0.0.1", port=40000 + replica),))

"""What plugin act-hook tests build: a LaunchContext over a temp dir, and a vLLM assignment across hosts."""

from __future__ import annotations

from pathlib import Path

from agentd.config import load_settings
from agentd.runtime import LaunchContext
from agentd.runtime.ports import PortAllocator
from agentd.types import Assignment, Part, PartEndpoint, ReplicaPlan, RuntimeOptions


def launch_context(tmp: Path, node: str = "a", simulated: bool = False, **settings) -> LaunchContext:
    """A host `node` with its data dir in `tmp`: `ray_port` hands out real free ports from the Ray range."""
    s = load_settings(data_dir=str(tmp), node_name=node, **settings)
    given: dict[str, int] = {}
    alloc = PortAllocator(*s.ray_port_range, in_use=lambda: set(given.values()))

    def ray_port(key, count=1):
        if key not in given:
            given[key] = alloc.allocate(count)[0]
            for j in range(1, count):
                given[f"{key}#{j}"] = given[key] + j
        return given[key]

    return LaunchContext(node=node, work_dir=tmp / "work", settings=s, simulated_gpus=simulated,
                         port=lambda k: 0, ray_port=ray_port)


def vllm_assignment(hosts: list[str], tp=2, pp=1, **opts) -> Assignment:
    """A replica of /models/qwen with one part per host, two GPUs each, endpoints 10.1.0.N:4010N-1."""
    parts = tuple(Part(host=h, role="main" if i == 0 else "worker", gpus=(0, 1), env={"CUDA_VISIBLE_DEVICES": "0,1"})
                  for i, h in enumerate(hosts))
    return Assignment(deployment="qwen", replica=1, term=4, model="/models/qwen", runtime="vllm",
                      options=RuntimeOptions(**opts), plan=ReplicaPlan(tensor_parallel=tp, pipeline_parallel=pp,
                                                                      parts=parts),
                      endpoints=tuple(PartEndpoint(host=h, address=f"10.1.0.{i + 1}", port=40100 + i)
                                      for i, h in enumerate(hosts)))

"""vLLM runtime plugin: tensor and pipeline parallel, multi-host through Ray."""

from __future__ import annotations

from agentd.plugins import RuntimeInfo, hookimpl

NAME = "vllm"


@hookimpl
def agentd_runtime():
    return RuntimeInfo(
        name=NAME,
        formats=("safetensors",),
        description="vLLM: tensor/pipeline parallel on NVIDIA GPUs, multi-host through Ray",
    )

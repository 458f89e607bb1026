"""vLLM runtime plugin: tensor and pipeline parallel, multi-host through Ray."""

from __future__ import annotations

from agentd.plugins.api import RuntimeInfo, hookimpl
from agentd_vllm.installed import agentd_installed  # noqa: F401 (describe hook, re-exported for pluggy)
from agentd_vllm.load import agentd_load_path, agentd_read_load  # noqa: F401 (proxy routing hooks)
from agentd_vllm.placement import (  # noqa: F401 (placement hooks, re-exported for pluggy)
    agentd_constraints,
    agentd_estimate,
    agentd_explain,
    agentd_layout_args,
    agentd_propose,
)
from agentd_vllm.process import (  # noqa: F401 (act-phase hooks, re-exported for pluggy)
    agentd_launch,
    agentd_reserved_launch,
    agentd_stop,
)

# The plugin API this plugin was written for (agentd.plugins.api.API_VERSION; docs/plugins.md, "Versioning").
# pyproject.toml says the same in its keywords, for `agentd version` to read without importing the plugin.
AGENTD_PLUGIN_API = "1.2"
NAME = "vllm"


@hookimpl
def agentd_runtime():
    return RuntimeInfo(
        name=NAME,
        formats=("safetensors",),
        description="vLLM: tensor/pipeline parallel on NVIDIA GPUs, multi-host through Ray",
    )


@hookimpl
def agentd_model_file_roles(runtime):
    """Every host of a multi-host replica loads its own shard of the weights from local disk."""
    return ("main", "worker") if runtime == NAME else None

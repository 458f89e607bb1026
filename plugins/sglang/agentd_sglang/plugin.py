"""SGLang runtime plugin: tensor and pipeline parallel, expert parallel for MoE, multi-node through
SGLang's own --nnodes/--node-rank/--dist-init-addr (no Ray)."""

from __future__ import annotations

from agentd.plugins.api import RuntimeInfo, hookimpl
from agentd_sglang.installed import agentd_installed  # noqa: F401 (describe hook, re-exported for pluggy)
from agentd_sglang.load import agentd_load_path, agentd_read_load  # noqa: F401 (proxy routing hooks)
from agentd_sglang.placement import (  # noqa: F401 (placement hooks, re-exported for pluggy)
    agentd_constraints,
    agentd_estimate,
    agentd_explain,
    agentd_layout_args,
    agentd_propose,
)
from agentd_sglang.process import (  # noqa: F401 (act-phase hooks, re-exported for pluggy)
    agentd_launch,
    agentd_reserved_launch,
)

# The plugin API this plugin was written for; pyproject.toml's keywords say the same for `agentd version`.
AGENTD_PLUGIN_API = "1.2"
NAME = "sglang"


@hookimpl
def agentd_runtime():
    return RuntimeInfo(
        name=NAME,
        formats=("safetensors",),
        description="SGLang: tensor/pipeline/expert parallel on NVIDIA GPUs, multi-node with --nnodes",
    )

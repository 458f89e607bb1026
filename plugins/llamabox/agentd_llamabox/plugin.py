"""llama-box / llama.cpp runtime plugin: GGUF models with layers offloaded to rpc-servers."""

from __future__ import annotations

from agentd.plugins.api import RuntimeInfo, hookimpl
from agentd_llamabox.installed import agentd_installed  # noqa: F401 (describe hook, re-exported for pluggy)
from agentd_llamabox.load import agentd_load_path, agentd_read_load  # noqa: F401 (proxy routing hooks)
from agentd_llamabox.placement import (  # noqa: F401 (placement hooks, re-exported for pluggy)
    agentd_constraints,
    agentd_estimate,
    agentd_layout_args,
    agentd_propose,
)
from agentd_llamabox.process import (  # noqa: F401 (act-phase hooks, re-exported for pluggy)
    agentd_health,
    agentd_launch,
    agentd_reserved_launch,
)

# The plugin API this plugin was written for (agentd.plugins.api.API_VERSION; docs/plugins.md, "Versioning").
# pyproject.toml says the same in its keywords, for `agentd version` to read without importing the plugin.
AGENTD_PLUGIN_API = "1.2"
NAME = "llamabox"


@hookimpl
def agentd_runtime():
    return RuntimeInfo(
        name=NAME,
        formats=("gguf",),
        description="llama-box or llama.cpp llama-server, with layers offloaded to rpc-servers",
        host_memory=True,  # llama.cpp runs layers on CPUs: hosts without GPUs serve with --allow-cpu-offload
    )


@hookimpl
def agentd_model_file_roles(runtime):
    """Only the main server reads the GGUF; rpc-servers receive their tensors from it over the network."""
    return ("main",) if runtime == NAME else None

"""llama-box / llama.cpp runtime plugin: GGUF models with layers offloaded to rpc-servers."""

from __future__ import annotations

from agentd.plugins import RuntimeInfo, hookimpl

NAME = "llamabox"


@hookimpl
def agentd_runtime():
    return RuntimeInfo(
        name=NAME,
        formats=("gguf",),
        description="llama-box or llama.cpp llama-server, with layers offloaded to rpc-servers",
    )

"""What a runtime plugin hands the supervisor, and what the supervisor reports back.

A plugin's `agentd_launch` hook turns one part of an assignment into
`ProcessSpec`s: the argv (a list, never a shell string), the environment, the
ports it will bind, how to tell it is ready, and which endpoints must accept
connections before it may start (a llama-server needs its rpc-servers, a Ray
worker its head). The supervisor owns everything after that: spawning,
probing, restarting, stopping. Specs are stored in the process records on
disk, so they are pydantic values that round-trip through JSON.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from agentd.plugins.api import (  # noqa: F401 (moved to the plugin API)
    Endpoint,
    HealthVerdict,
    HttpProbe,
    LaunchContext,
    ProbeResult,
    ProcessSpec,
    TcpProbe,
)


class _Value(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------- status


class ProcessStatus(_Value):
    name: str
    part_index: int
    role: str
    state: str
    reason: str
    restarts: int = 0
    pid: int | None = None
    since: float = 0.0  # wall-clock seconds of the last transition
    ports: tuple[int, ...] = ()
    log_path: str = ""
    argv: tuple[str, ...] = ()
    port_in_use: int = 0  # the last start found this port held by another process (0: no clash)


class InstanceStatus(_Value):
    """One instance on this host, as `agentd ps` shows it."""

    instance_id: str
    deployment: str
    replica: int
    generation: int
    runtime: str
    state: str
    reason: str
    restarts: int = 0
    processes: tuple[ProcessStatus, ...] = ()

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

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class _Value(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Endpoint(_Value):
    """A TCP address; `host` as peers reach it."""

    host: str
    port: int = Field(ge=1, le=65535)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class HttpProbe(_Value):
    """Readiness/liveness over HTTP GET on a fresh connection (never a pooled one)."""

    kind: Literal["http"] = "http"
    host: str
    port: int = Field(ge=1, le=65535)
    path: str = "/health"


class TcpProbe(_Value):
    """Readiness as "accepts a TCP connection", for servers without HTTP (rpc-server, Ray GCS).

    Used only until the process is ready: ggml-rpc-server serves one client
    at a time, so probing it while llama-server is connected would queue in
    its backlog and look like an outage.
    """

    kind: Literal["tcp"] = "tcp"
    host: str
    port: int = Field(ge=1, le=65535)


class ProcessSpec(_Value):
    """One process a part needs on this host."""

    name: str  # unique within the instance: "main", "rpc", "ray-head", ...
    argv: tuple[str, ...]
    env: dict[str, str] = Field(default_factory=dict)  # added to (and overriding) the agent's environment
    env_remove_prefixes: tuple[str, ...] = ()  # inherited variables to drop, e.g. "LLAMA_ARG_"
    cwd: str | None = None
    part_index: int = 0
    role: str = "main"
    listen: Endpoint | None = None  # where it serves (what dependents wait for)
    ports: tuple[Endpoint, ...] = ()  # every address:port it binds: checked free before launch
    ready: HttpProbe | TcpProbe | None = Field(default=None, discriminator="kind")
    wait_for: tuple[Endpoint, ...] = ()  # must accept TCP before launch; a local one restarting restarts this
    gpus: tuple[int, ...] = ()  # host GPU indices it uses: checked released after stop
    startup_timeout: float | None = Field(default=None, gt=0)  # None: the supervisor's setting
    stop_signal: Literal["SIGTERM", "SIGINT", "SIGQUIT"] = "SIGTERM"
    stop_grace: float | None = Field(default=None, ge=0)  # None: the supervisor's setting

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.fullmatch(v):
            raise ValueError(f"process name {v!r} must be lowercase letters, digits, '.', '_' or '-'")
        return v

    @field_validator("argv")
    @classmethod
    def _argv(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or not v[0]:
            raise ValueError("argv must name a program")
        return v


class HealthVerdict(_Value):
    """A plugin's reading of one probe answer (`agentd_health`).

    `ready`: serving. `alive`: not ready but not failing either (a model still
    loading answers 503 by design). Neither: a failure that counts toward
    liveness.
    """

    ready: bool
    alive: bool = True
    detail: str = ""


class ProbeResult(_Value):
    """What a probe saw, before any plugin interprets it."""

    ok: bool  # connected and got a 2xx (HTTP) / connected (TCP)
    status: int | None = None  # HTTP status code
    body: str = ""  # the first bytes of the body
    error: str = ""  # connection refused, timed out, ...
    timed_out: bool = False

    @property
    def detail(self) -> str:
        if self.error:
            return self.error
        if self.status is not None:
            return f"HTTP {self.status} {self.body[:120]}".strip()
        return "ok" if self.ok else "failed"


@dataclass(frozen=True)
class LaunchContext:
    """What a plugin may know about the host when it builds specs.

    `port(key)` hands out a free local port from the configured range (the
    same key gives the same port for one instance); `ray_port(key, count=1)`
    does the same from the Ray range, the first of `count` consecutive ports.
    `settings` is the agent's agentd.config.Settings.
    `simulated_gpus` is true when the host's GPUs come from a simulated
    inventory: the runtime then sees no GPU and layers planned for local GPUs
    stay in host RAM.
    """

    node: str
    work_dir: Path
    settings: Any
    simulated_gpus: bool = False
    port: Callable[[str], int] = field(default=lambda key: 0)
    ray_port: Callable[..., int] = field(default=lambda key, count=1: 0)


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

"""The daemon's configuration: defaults < TOML file < AGENTD_* environment < CLI flags.

Timing settings are validated together at load, because a heartbeat that is
not well inside the election timeout causes spurious elections, and a
node-down grace shorter than an election would re-place replicas on every
leader change.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from agentd.cluster.report_timing import RelayTimings
from agentd.defaults import DEFAULT_CONFIG_PATH, token_listen_default
from agentd.errors import ConfigError

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Seconds from 0.5, "500ms", "1.5s", "2m" or "1h"."""
    if isinstance(value, bool):
        raise ValueError("a duration must be a number of seconds or a string like '500ms'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    raise ValueError(f"invalid duration {value!r}: use seconds or a string like '500ms', '2s', '1m'")


def config_path() -> Path:
    return Path(os.environ.get("AGENTD_CONFIG", str(DEFAULT_CONFIG_PATH)))


class Settings(BaseSettings):
    """Effective configuration of one agent. Field names are the TOML keys."""

    model_config = SettingsConfigDict(
        env_prefix="AGENTD_",
        extra="forbid",
        validate_default=True,
        populate_by_name=True,
    )

    node_name: str = Field(default_factory=lambda: os.uname().nodename, min_length=1)
    listen: str = "127.0.0.1:7070"
    advertise: str = ""  # address peers use to reach us; defaults to `listen`
    http_listen: str = "127.0.0.1:7080"
    data_dir: Path = Path("/var/lib/agentd")
    join: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Node names that vote; empty means the first `max_voters` members to join.
    voters: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_voters: int = 5  # 1, 3, 5 or 7 (checked below: the environment gives a string, which Literal refuses)
    # Members beyond the voters: learners that keep the whole log, ready to be promoted; every other host
    # watches the committed state from a voter (docs/cluster.md).
    standby_learners: int = Field(default=2, ge=0, le=7)
    labels: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    # Where this host's models are (docs/models.md): scanned and reported; fetched copies go to the first.
    # Empty = <data_dir>/models.
    model_dirs: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    model_fetch_concurrency: int = Field(default=2, ge=1, le=64)  # models fetched from peers at once
    model_fetch_rate: float = Field(default=0.0, ge=0.0)  # bytes per second per fetch; 0 = unlimited
    model_transfer_port: int = Field(default=0, ge=0, le=65535)  # copies' byte stream, on listen's host; 0 = any

    heartbeat_interval: float = 0.1
    # A hung leader is replaced after about min + (max - min) / 3 (the first of two followers); see docs/raft.md.
    election_timeout_min: float = 0.8
    election_timeout_max: float = 1.2
    node_down_grace: float = 30.0
    inventory_refresh: float = 5.0

    simulate_inventory: Path | None = None
    port_range: Annotated[tuple[int, int], NoDecode] = (40000, 40999)
    ray_port_range: Annotated[tuple[int, int], NoDecode] = (41000, 41999)
    llama_server_binary: str = ""  # empty = find llama-box, then llama-server
    rpc_server_binary: str = ""  # empty = find ggml-rpc-server, then rpc-server
    vllm_binary: str = "vllm"
    # Runtime supervision (docs/runtime.md). Durations accept "500ms", "2s", "5m".
    runtime_startup_timeout: float = 600.0  # spawn -> ready, else FATAL with the last log lines
    runtime_health_interval: float = 5.0  # liveness probe period
    runtime_health_timeout: float = 2.0  # one probe, on its own connection
    runtime_liveness_failures: int = Field(default=3, ge=1)  # failed probes in a row before a restart
    runtime_stop_grace: float = 10.0  # SIGTERM -> SIGKILL
    # A replica a drain replaced answers the requests it holds for at most this long before it stops (0: at once).
    drain_handoff_timeout: float = Field(default=300.0, ge=0)
    runtime_start_retries: int = Field(default=3, ge=1)  # failed starts in a row before FATAL
    runtime_backoff_initial: float = 1.0  # first restart delay
    runtime_backoff_max: float = 300.0  # restart delay cap
    runtime_stable_after: float = 60.0  # a run this long resets the restart delay
    runtime_log_keep: int = Field(default=5, ge=1)  # previous runs' log files kept per process
    runtime_log_max_bytes: int = Field(default=64 * 1024 * 1024, ge=4096)  # copy-truncate above this

    # Security and operations (docs/security.md).
    tls_dir: Path | None = None  # ca.crt, node.crt, node.key; default <data_dir>/tls
    token_listen: str = ""  # TLS without client certificate: joins, bearer tokens; default listen port + 1
    # One-time join token (`agentd token create`): with `join`, a host without a certificate gets one at start.
    join_token: SecretStr = SecretStr("")  # shown as ********** by `agentd config show`
    insecure: bool = False  # no TLS, no authentication; logs a warning at start
    # Secure clusters: every instance process runs with agentd's accept guard preloaded, so only the instance's
    # hosts reach its listeners (docs/security.md); "required" fails a launch where it cannot be built, "off"
    # opts out.
    instance_guard: Literal["required", "off"] = "required"
    # Addresses or CIDR blocks the guard also lets in, on every instance: a second network the hosts' NCCL or Ray
    # traffic leaves from (NCCL_SOCKET_IFNAME), whose addresses are not the hosts' endpoint addresses.
    instance_guard_allow: Annotated[list[str], NoDecode] = Field(default_factory=list)
    stop_models_on_exit: bool = False  # SIGTERM stops this host's model servers before exiting
    drain_on_stop: bool = False  # deprecated name of stop_models_on_exit (before 0.2.0)
    proxy_connect_timeout: float = 5.0  # /v1/ proxy: then try another replica
    proxy_read_timeout: float = 600.0  # /v1/ proxy: longest silence from a model server
    http_max_body: int = Field(default=64 * 1024 * 1024, ge=1024)  # /v1/ request body limit, bytes
    http_header_timeout: float = 30.0  # HTTP side: a connection idle or still sending its headers is closed
    # Serving on demand (docs/on-demand.md). An idle deployment is unloaded only while every live host's proxy
    # activity report is at most this old (reports go every second, and at once on a first request).
    idle_report_max_age: float = 3.0
    wake_timeout: float = 300.0  # /v1/: how long a request for an IDLE model is held while it loads
    wake_queue: int = Field(default=256, ge=1)  # /v1/: requests held per agent for models being woken; then 503
    # Replicas by load (docs/on-demand.md, agentd/autoscale.py): how long the average queue per replica must stay
    # above target_queue before a replica is added, below half of it before one is removed, the pause after any
    # change, and how long a replica being removed may take to answer its requests before it is stopped anyway.
    autoscale_up_after: float = 15.0
    autoscale_down_after: float = 120.0
    autoscale_cooldown: float = 60.0
    scale_down_timeout: float = 300.0
    # Routing by load (docs/on-demand.md). A replica is full when one more request would wait there beyond this many
    # (llama-server: beyond its slots; vLLM, SGLang: in their own queue); full replicas are skipped.
    proxy_replica_max_queue: int = Field(default=8, ge=0)
    proxy_saturation_queue: int = Field(default=128, ge=0)  # per model and agent, waiting while all are full; then 429
    proxy_saturation_wait: float = 30.0  # longest such wait; then 429 with Retry-After
    proxy_prefix_affinity: bool = True  # requests sharing a long prompt prefix go to the same replica
    http_tls_cert: Path | None = None  # PEM chain; with http_tls_key, the HTTP side serves HTTPS
    http_tls_key: Path | None = None

    log_format: Literal["auto", "text", "json"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    plugins: Annotated[list[str] | None, NoDecode] = None  # allowlist; None = all installed
    disable_plugins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator(
        "heartbeat_interval",
        "election_timeout_min",
        "election_timeout_max",
        "node_down_grace",
        "inventory_refresh",
        "proxy_connect_timeout",
        "proxy_read_timeout",
        "http_header_timeout",
        "idle_report_max_age",
        "wake_timeout",
        "autoscale_up_after",
        "autoscale_down_after",
        "autoscale_cooldown",
        "scale_down_timeout",
        "proxy_saturation_wait",
        mode="before",
    )
    @classmethod
    def _durations(cls, v: Any) -> float:
        return parse_duration(v)

    @field_validator(
        "runtime_startup_timeout", "runtime_health_interval", "runtime_health_timeout", "runtime_stop_grace",
        "drain_handoff_timeout",
        "runtime_backoff_initial", "runtime_backoff_max", "runtime_stable_after", mode="before",
    )
    @classmethod
    def _runtime_durations(cls, v: Any) -> float:
        return parse_duration(v)

    @field_validator("max_voters")
    @classmethod
    def _odd_voters(cls, v: int) -> int:
        if v not in (1, 3, 5, 7):
            raise ValueError(f"max_voters must be 1, 3, 5 or 7, got {v}")
        return v

    @property
    def stops_models_on_exit(self) -> bool:
        """`stop_models_on_exit`, or its deprecated name `drain_on_stop`."""
        return self.stop_models_on_exit or self.drain_on_stop

    @model_validator(mode="after")
    def _runtime_invariants(self) -> Settings:
        if not 0 < self.runtime_health_timeout < self.runtime_health_interval:
            raise ValueError(
                f"runtime_health_timeout ({self.runtime_health_timeout:g}s) must be positive and below "
                f"runtime_health_interval ({self.runtime_health_interval:g}s)"
            )
        if not 0 < self.runtime_backoff_initial <= self.runtime_backoff_max:
            raise ValueError(
                f"runtime_backoff_initial ({self.runtime_backoff_initial:g}s) must be positive and not exceed "
                f"runtime_backoff_max ({self.runtime_backoff_max:g}s)"
            )
        if self.runtime_startup_timeout <= 0:
            raise ValueError("runtime_startup_timeout must be positive")
        (a, b), (c, d) = self.port_range, self.ray_port_range
        if a <= d and c <= b:
            raise ValueError(f"port_range {a}-{b} and ray_port_range {c}-{d} overlap")
        return self

    @field_validator("join", "voters", "plugins", "disable_plugins", "model_dirs", "instance_guard_allow",
                     mode="before")
    @classmethod
    def _comma_lists(cls, v: Any) -> Any:
        if isinstance(v, str) and v.lstrip().startswith("["):
            return json.loads(v)
        if isinstance(v, str):
            return [part.strip() for part in v.split(",") if part.strip()]
        return v

    @field_validator("instance_guard_allow")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        out = []
        for item in v:
            try:
                out.append(str(ipaddress.ip_network(item, strict=False)))
            except ValueError:
                raise ValueError(f"instance_guard_allow: {item!r} is not an address or a CIDR block") from None
        return out

    @field_validator("model_dirs")
    @classmethod
    def _absolute_dirs(cls, v: list[Path]) -> list[Path]:
        relative = [str(p) for p in v if not p.is_absolute()]
        if relative:
            raise ValueError(f"model directories must be absolute paths, got {', '.join(relative)}")
        return v

    @field_validator("labels", mode="before")
    @classmethod
    def _label_text(cls, v: Any) -> Any:
        """The environment spells labels `rack=a,zone=z1` (as kubectl does) or as a JSON object."""
        if not isinstance(v, str):
            return v
        if v.lstrip().startswith("{"):
            return json.loads(v)
        labels = {}
        for item in filter(None, (part.strip() for part in v.split(","))):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"{item!r} is not KEY=VALUE")
            labels[key.strip()] = value.strip()
        return labels

    @field_validator("listen", "http_listen")
    @classmethod
    def _host_port(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{v!r} is not HOST:PORT")
        return v

    @field_validator("token_listen")
    @classmethod
    def _optional_host_port(cls, v: str) -> str:
        return cls._host_port(v) if v else v

    @field_validator("port_range", "ray_port_range", mode="before")
    @classmethod
    def _port_range_text(cls, v: Any) -> Any:
        """The environment spells a range `40000,40999`, `40000-40999` or `[40000, 40999]`."""
        if not isinstance(v, str):
            return v
        text = v.strip()
        if text.startswith("["):
            return json.loads(text)
        bounds = [part.strip() for part in re.split(r"[,-]", text)]
        if len(bounds) != 2 or not all(b.isdigit() for b in bounds):
            raise ValueError(f"{v!r} is not a port range (LOW,HIGH or LOW-HIGH)")
        return tuple(int(b) for b in bounds)

    @field_validator("port_range", "ray_port_range")
    @classmethod
    def _port_range(cls, v: tuple[int, int]) -> tuple[int, int]:
        lo, hi = v
        if not 1024 <= lo <= hi <= 65535:
            raise ValueError(f"port range {lo}-{hi} must satisfy 1024 <= low <= high <= 65535")
        return v

    @model_validator(mode="after")
    def _timing_invariants(self) -> Settings:
        if self.heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be positive")
        if not self.heartbeat_interval * 3 < self.election_timeout_min:
            raise ValueError(
                f"heartbeat_interval × 3 ({self.heartbeat_interval * 3:g}s) must be below "
                f"election_timeout_min ({self.election_timeout_min:g}s)"
            )
        if not self.election_timeout_min <= self.election_timeout_max:
            raise ValueError(
                f"election_timeout_min ({self.election_timeout_min:g}s) must not exceed "
                f"election_timeout_max ({self.election_timeout_max:g}s)"
            )
        if not self.election_timeout_max < self.node_down_grace:
            raise ValueError(
                f"election_timeout_max ({self.election_timeout_max:g}s) must be below "
                f"node_down_grace ({self.node_down_grace:g}s)"
            )
        # A host whose relaying voter stalls must reach the leader directly before its lease runs out; the
        # relay's timeouts derive from the grace (agentd/cluster/report_timing.py states the rule).
        RelayTimings.for_grace(self.node_down_grace).check()
        if self.inventory_refresh <= 0:
            raise ValueError("inventory_refresh must be positive")
        if self.proxy_connect_timeout <= 0 or self.proxy_read_timeout <= 0:
            raise ValueError("proxy_connect_timeout and proxy_read_timeout must be positive")
        if not self.idle_report_max_age > 1.0:
            raise ValueError(f"idle_report_max_age ({self.idle_report_max_age:g}s) must be above the report "
                             "interval (1s): hosts report that often")
        if not self.wake_timeout > 0:
            raise ValueError("wake_timeout must be positive")
        if min(self.autoscale_up_after, self.autoscale_down_after, self.autoscale_cooldown) < 0:
            raise ValueError("autoscale_up_after, autoscale_down_after and autoscale_cooldown must not be negative")
        if not self.scale_down_timeout > 0:
            raise ValueError("scale_down_timeout must be positive")
        if self.proxy_saturation_wait < 0:
            raise ValueError("proxy_saturation_wait must not be negative")
        if not self.http_header_timeout > 0:
            raise ValueError("http_header_timeout must be positive")
        if (self.http_tls_cert is None) != (self.http_tls_key is None):
            raise ValueError("http_tls_cert and http_tls_key go together: set both for HTTPS, or neither")
        if self.token_listen_address.endswith(":65536"):
            raise ValueError("listen uses port 65535, so the token port cannot default to the next one: "
                             "set token_listen")
        if self.token_listen_address == self.listen:
            raise ValueError(f"token_listen ({self.token_listen_address}) must differ from listen: "
                             "one port requires client certificates, the other must not ask for them")
        return self

    @property
    def advertise_address(self) -> str:
        return self.advertise or self.listen

    @property
    def model_directories(self) -> tuple[Path, ...]:
        """`model_dirs`, or <data_dir>/models."""
        return tuple(self.model_dirs) or (self.data_dir / "models",)

    @property
    def tls_directory(self) -> Path:
        return self.tls_dir or self.data_dir / "tls"

    @property
    def token_listen_address(self) -> str:
        """The token port: `token_listen`, else the `listen` host on the next port."""
        return self.token_listen or token_listen_default(self.listen)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = config_path()
        if path.is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


def load_settings(**overrides: Any) -> Settings:
    """Load and validate; every failure becomes one ConfigError sentence.

    `overrides` are CLI flags; keys whose value is None are treated as unset.
    """
    flags = {k: v for k, v in overrides.items() if v is not None}
    path = config_path()
    if "AGENTD_CONFIG" in os.environ and not path.is_file():
        raise ConfigError(f"config file {path} (from AGENTD_CONFIG) does not exist")
    try:
        return Settings(**flags)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc), where=_file_to_blame(exc, path, flags)) from None
    except SettingsError as exc:  # an AGENTD_* variable that is not valid JSON for its field
        raise ConfigError(f"cannot read the environment: {exc}") from None
    except (OSError, ValueError) as exc:  # unreadable or non-TOML file
        raise ConfigError(f"cannot read configuration: {exc}", where=str(path)) from None


def _file_to_blame(exc: ValidationError, path: Path, flags: dict[str, Any]) -> str | None:
    """The TOML file's path when it supplied a setting that failed; None when a flag or variable did.

    A whole-config invariant (no field in its location) may involve the file, so it names the file.
    """
    if not path.is_file():
        return None
    failed = {str(err["loc"][0]) for err in exc.errors() if err["loc"]}
    overridden = set(flags) | {name for name in failed if f"AGENTD_{name.upper()}" in os.environ}
    if failed and failed <= overridden:
        return None
    return str(path)


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "invalid configuration: " + "; ".join(parts)

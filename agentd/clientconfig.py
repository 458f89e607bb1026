"""The few settings a client command needs, read without pydantic.

`agentd status` and `agentd ps` need five settings (where the local agent
listens, whether the cluster is insecure, where certificates are); loading
and validating the whole configuration with pydantic-settings costs ~0.3 s,
more than the call itself. This module reads those five from the same places
with the same precedence (AGENTD_* environment > TOML file > defaults) and
defers to `agentd.config.load_settings` for anything it is not sure of: a
value of an unexpected type or spelling, an unreadable file, a missing
AGENTD_CONFIG file. That way every problem with these settings is reported
in the words of the full loader, and a value is never read differently.
Settings that only the daemon uses are not checked by client commands;
`agentd config show` checks everything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentd.defaults import DEFAULT_CONFIG_PATH, DEFAULT_DATA_DIR, DEFAULT_LISTEN, token_listen_default

_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})  # pydantic's spellings of a bool
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


@dataclass(frozen=True)
class ClientSettings:
    """What `ControlClient.for_cli` reads; the same names as in `agentd.config.Settings`."""

    listen: str = DEFAULT_LISTEN
    token_listen: str = ""
    insecure: bool = False
    tls_dir: Path | None = None
    data_dir: Path = DEFAULT_DATA_DIR

    @property
    def tls_directory(self) -> Path:
        return self.tls_dir or self.data_dir / "tls"

    @property
    def token_listen_address(self) -> str:
        return self.token_listen or token_listen_default(self.listen)


class _Unsure(Exception):
    """A value this reader does not vouch for: the full loader decides."""


def client_settings(environ: Mapping[str, str] | None = None) -> ClientSettings:
    """The client's settings: read here when plain, else through the full configuration loader."""
    env = os.environ if environ is None else environ
    try:
        return _read(env)
    except _Unsure:
        from agentd.config import load_settings

        s = load_settings()  # raises the ConfigError a bad value deserves
        return ClientSettings(listen=s.listen, token_listen=s.token_listen, insecure=s.insecure, tls_dir=s.tls_dir,
                              data_dir=s.data_dir)


def _read(env: Mapping[str, str]) -> ClientSettings:
    path = Path(env["AGENTD_CONFIG"]) if "AGENTD_CONFIG" in env else DEFAULT_CONFIG_PATH
    file: dict[str, Any] = {}
    if path.is_file():
        import tomllib

        try:
            with path.open("rb") as f:
                file = tomllib.load(f)
        except (OSError, ValueError):
            raise _Unsure from None
    elif "AGENTD_CONFIG" in env:
        raise _Unsure  # a named file that is missing is an error
    # pydantic-settings matches variable names case-insensitively (the last spelling wins).
    lowered = {k.lower(): v for k, v in env.items() if k[:7].lower() == "agentd_"}

    def value(name: str) -> Any:
        key = f"agentd_{name}"
        return lowered[key] if key in lowered else file.get(name)

    listen = _host_port(value("listen"), DEFAULT_LISTEN, optional=False)
    token_listen = _host_port(value("token_listen"), "", optional=True)
    if token_listen_default(listen).endswith(":65536") and not token_listen:
        raise _Unsure
    if (token_listen or token_listen_default(listen)) == listen:
        raise _Unsure
    return ClientSettings(listen=listen, token_listen=token_listen, insecure=_bool(value("insecure")),
                          tls_dir=_path(value("tls_dir"), None), data_dir=_path(value("data_dir"), DEFAULT_DATA_DIR))


def _host_port(v: Any, default: str, *, optional: bool) -> str:
    if v is None:
        return default
    if not isinstance(v, str):
        raise _Unsure
    if optional and v == "":
        return v
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise _Unsure
    return v


def _bool(v: Any) -> bool:
    if v is None:
        return False
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in _TRUE | _FALSE:
        return v.lower() in _TRUE
    raise _Unsure


def _path(v: Any, default: Path | None) -> Path | None:
    if v is None:
        return default
    if not isinstance(v, str) or not v:
        raise _Unsure
    return Path(v)

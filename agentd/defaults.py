"""Defaults that the full configuration (agentd.config) and the client's light reader (agentd.clientconfig)
share. Here, below both, so that neither imports the other for them: clientconfig defers to config's loader
for a value it is not sure of, and config must not import clientconfig back."""

from __future__ import annotations

from pathlib import Path

DEFAULT_CONFIG_PATH = Path("/etc/agentd/agentd.toml")
DEFAULT_LISTEN = "127.0.0.1:7070"
DEFAULT_DATA_DIR = Path("/var/lib/agentd")


def token_listen_default(listen: str) -> str:
    """The token port when `token_listen` is unset: the `listen` host on the next port."""
    host, _, port = listen.rpartition(":")
    return f"{host}:{int(port) + 1 if int(port) else 0}"

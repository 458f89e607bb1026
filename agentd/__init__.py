"""agentd: one daemon per GPU host; together they form a cluster that serves LLMs."""

from __future__ import annotations


def __getattr__(name: str) -> str:
    """`agentd.__version__`, read from the package metadata on first use.

    Lazily, because importlib.metadata costs ~35 ms at import (it pulls in the
    email package), and `agentd ps` and `agentd status` never need it.
    """
    if name != "__version__":
        raise AttributeError(f"module 'agentd' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        value = version("agentd")
    except PackageNotFoundError:  # running from a source tree that was never installed
        value = "0.0.0+unknown"
    globals()["__version__"] = value
    return value

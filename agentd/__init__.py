"""agentd: one daemon per GPU host; together they form a cluster that serves LLMs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("agentd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

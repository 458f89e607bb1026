"""The `agentd` command line. See agentd.cli.main."""

from agentd.cli.main import main

__all__ = ["main"]

"""The `agentd` command line. See agentd.cli.main."""

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before grpc loads: no C-core chatter on stderr

from agentd.cli.main import main

__all__ = ["main"]

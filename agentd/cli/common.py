"""What every subcommand module shares: exit codes, the parser class, --json output, KEY=VALUE options.

Subcommand modules import these from here, never from `agentd.cli.main`,
which imports the subcommand modules (only the one a command line needs).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from agentd.errors import InvalidInput

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~3 ms of `agentd version`)
if TYPE_CHECKING:
    from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INVALID = 2
EXIT_UNAVAILABLE = 3


class UsageError(InvalidInput):
    """A bad flag or value on the command line."""


class Parser(argparse.ArgumentParser):
    """argparse, but errors raise instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def client_options() -> argparse.ArgumentParser:
    """`--server`, for the commands that talk to an agent."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--server", metavar="ADDR", help="agent to talk to (default: this host's agent)")
    return p


def common_options() -> argparse.ArgumentParser:
    """Options every subcommand accepts, before or after its name.

    SUPPRESS keeps a subcommand's unset flag from overwriting the same flag
    given before the subcommand name.
    """
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="machine-readable JSON on stdout")
    p.add_argument("--log-format", choices=["auto", "text", "json"], default=argparse.SUPPRESS,
                   help="log line format on stderr (default: text on a TTY, JSON otherwise)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   default=argparse.SUPPRESS, help="log verbosity (default: info)")
    return p


def key_values(items: list[str], flag: str) -> dict[str, str]:
    """Repeated `--flag KEY=VALUE` options as a dict; an item without `=` or a key is invalid input."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInput(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def emit(args: argparse.Namespace, data: Any, human: str | Callable[[], str]) -> None:
    """Print `data` as JSON with --json, else the human text.

    Either may be a function, called only when needed: turning protobuf replies into dicts loads
    google.protobuf.json_format, which the human output of `agentd ps` does without.
    """
    if getattr(args, "json", False):
        print(json.dumps(data() if callable(data) else data, indent=2, default=str))
    else:
        print(human() if callable(human) else human)

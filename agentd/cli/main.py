"""The `agentd` command: subcommands, the --json convention and exit codes.

Exit codes: 0 OK, 1 unexpected failure, 2 invalid input or usage, 3 could not
be placed or not available. Every error is one line on stderr; a traceback
means a bug in agentd, and is shown only with AGENTD_DEBUG=1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from agentd.errors import AgentdError, InvalidInput, NotAvailable, Unplaceable

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


def command_modules() -> list[Any]:
    """Each module adds its subcommands through `register(subparsers, parents)`."""
    from agentd.cli import basic, cluster, inventory, model, plan, security

    return [basic, inventory, model, security, plan, cluster]


def build_parser() -> Parser:
    parents = [common_options()]
    parser = Parser(
        prog="agentd",
        description="agentd: serve large language models on a cluster of GPU hosts.",
        parents=parents,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for module in command_modules():
        module.register(sub, parents)
    return parser


def emit(args: argparse.Namespace, data: Any, human: str | Callable[[], str]) -> None:
    """Print `data` as JSON with --json, else the human text."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        print(human() if callable(human) else human)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `agentd ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _run(argv: list[str]) -> int:
    from agentd.logs import setup_logging

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(f"agentd: error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    setup_logging(getattr(args, "log_format", "auto"), getattr(args, "log_level", "info"))
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_INVALID if argv else EXIT_OK
    try:
        return int(args.func(args) or EXIT_OK)
    except (Unplaceable, NotAvailable) as exc:
        print(f"agentd: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except InvalidInput as exc:
        print(f"agentd: error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except AgentdError as exc:
        print(f"agentd: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:
        raise
    except Exception as exc:
        if os.environ.get("AGENTD_DEBUG"):
            raise
        print(f"agentd: internal error: {type(exc).__name__}: {exc} (AGENTD_DEBUG=1 shows the trace)",
              file=sys.stderr)
        return EXIT_FAILURE

"""The `agentd` command: subcommands, the --json convention and exit codes.

Exit codes: 0 OK, 1 unexpected failure, 2 invalid input or usage, 3 could not
be placed or not available. Every error is one line on stderr; a traceback
means a bug in agentd, and is shown only with AGENTD_DEBUG=1.

Start-up time matters (operators run `agentd ps` in loops), so a command line
imports only the subcommand module that defines its command: `agentd version`
loads neither grpc nor pydantic. The whole parser (every module) is built for
`agentd --help`, for a command line whose command is not obvious, and to
report a usage error, so help texts and error messages are those of the whole
parser.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from agentd.cli.common import (
    EXIT_FAILURE,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    Parser,
    UsageError,
    common_options,
    emit,
    key_values,
)
from agentd.errors import AgentdError, InvalidInput, NotAvailable, Unplaceable

__all__ = [
    "COMMANDS",
    "EXIT_FAILURE",
    "EXIT_INVALID",
    "EXIT_OK",
    "EXIT_UNAVAILABLE",
    "Parser",
    "UsageError",
    "build_parser",
    "command_modules",
    "common_options",
    "emit",
    "key_values",
    "main",
]

# Each module (agentd.cli.<name>) adds its subcommands through `register(subparsers, parents)`, in this order
# (the order of `agentd --help`), and defines exactly the commands listed (tests/test_cli.py checks both ways).
COMMANDS: dict[str, tuple[str, ...]] = {
    "basic": ("version", "config", "plugins"),
    "inventory": ("inventory",),
    "model": ("model",),
    "security": ("init-ca", "certs", "token", "join", "keys"),
    "plan": ("plan",),
    "cluster": ("serve", "deploy", "ls", "ps", "rm", "scale", "nodes", "status", "watch", "logs"),
    "maintenance": ("cordon", "uncordon", "drain"),
    "ops": ("snapshot",),
}
# Options of the top-level parser that take a value (`--log-level debug version`).
_VALUE_OPTIONS = ("--log-format", "--log-level")


def command_modules(names: Sequence[str] | None = None) -> list[ModuleType]:
    """The subcommand modules, all of them or the named ones, in help order."""
    return [importlib.import_module(f"agentd.cli.{m}") for m in COMMANDS if names is None or m in names]


def build_parser(modules: Sequence[str] | None = None, command: str | None = None) -> Parser:
    """The parser of every command, or of the commands of `modules` only (same texts, fewer imports).

    With `command`, only that command's parser is built (the module's others are skipped: `serve` alone has
    some 25 options, and `agentd ps` does not need them).
    """
    parents = [common_options()]
    parser = Parser(
        prog="agentd",
        description="agentd: serve large language models on a cluster of GPU hosts.",
        parents=parents,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    target = sub if command is None else _OneCommand(sub, command)
    for module in command_modules(modules):
        module.register(target, parents)
    return parser


class _Nowhere:
    """Takes every call a module's `register` makes on a parser that is not built, and builds nothing."""

    def __getattr__(self, name: str) -> _Nowhere:
        return self

    def __call__(self, *args: object, **kwargs: object) -> _Nowhere:
        return self


class _OneCommand:
    """The subparsers action, as a module's `register` sees it, that builds the parser of one command only."""

    def __init__(self, sub: argparse._SubParsersAction, command: str):
        self._sub, self._command = sub, command

    def add_parser(self, name: str, **kwargs: object) -> object:
        return self._sub.add_parser(name, **kwargs) if name == self._command else _Nowhere()


def command_for(argv: Sequence[str]) -> str | None:
    """The command word of `argv` (one of COMMANDS); None when that takes more than a glance.

    Looks at the top-level options only as far as the command word: `--json`, `--log-level X`,
    `--log-format=X`. Anything else before the command (an abbreviation, `--help`, `--`) means None.
    """
    it = iter(argv)
    for arg in it:
        if arg == "--json" or any(arg.startswith(f"{opt}=") for opt in _VALUE_OPTIONS):
            continue
        if arg in _VALUE_OPTIONS:
            next(it, None)
            continue
        if arg.startswith("-"):
            return None
        return arg if any(arg in commands for commands in COMMANDS.values()) else None
    return None


def module_for(argv: Sequence[str]) -> str | None:
    """The module that defines the command of `argv` (see `command_for`); None when that takes more than a glance."""
    command = command_for(argv)
    return next((m for m, commands in COMMANDS.items() if command in commands), None)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `agentd ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _parse(argv: list[str]) -> tuple[Parser, object]:
    """Parse with the one module the command needs; a usage error is reported by the whole parser."""
    module = module_for(argv)
    if module is not None:
        parser = build_parser([module], command_for(argv))
        try:
            return parser, parser.parse_args(argv)
        except UsageError:
            pass  # the whole parser words the error (and knows every command, should the glance be wrong)
    parser = build_parser()
    return parser, parser.parse_args(argv)


def _run(argv: list[str]) -> int:
    try:
        parser, args = _parse(argv)
    except UsageError as exc:
        print(f"agentd: error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if getattr(args, "logs", True):  # a command that never logs (`version`) says logs=False: no `logging` import
        from agentd.logs import setup_logging

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

"""The pieces every command's parser is built from: one-line usage errors, subcommands, number types, --json."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from llm_proxy.ops.command_errors import EXIT_USAGE


class CommandParser(argparse.ArgumentParser):
    """Print a usage error as one line that points to --help, and exit 2."""

    def error(self, message: str) -> Any:
        command = self.prog.removeprefix("llm-proxy").strip()
        where = f"{command}: " if command else ""
        self.exit(EXIT_USAGE, f"llm-proxy: {where}{message} (see `{self.prog} --help`)\n")


def add_command(commands: Any, name: str, run: Callable[[argparse.Namespace], int], help_text: str,
                parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """Add a command that runs `run`, described by its docstring."""
    parser: argparse.ArgumentParser = commands.add_parser(name, help=help_text, description=run.__doc__,
                                                          parents=list(parents))
    parser.set_defaults(run=run)
    return parser


def add_group(commands: Any, name: str, help_text: str) -> Any:
    """Add a command that only holds subcommands, one of which is required; return their subparsers."""
    parser = commands.add_parser(name, help=help_text, description=help_text)
    return parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True,
                                 parser_class=CommandParser)


def _whole_number(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be at least {minimum}")
        return value
    return parse


positive, non_negative = _whole_number(1), _whole_number(0)


def json_option() -> argparse.ArgumentParser:
    """Return the parent parser of --json, for the commands that print a table or a record."""
    output = CommandParser(add_help=False)
    output.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return output

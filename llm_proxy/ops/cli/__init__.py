"""The `llm-proxy` command: the tree of its subcommands, one module a job, and one line for each failure."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from llm_proxy import __version__
from llm_proxy.audit.masking import mask_secrets
from llm_proxy.ops.cli import (
    audit_commands,
    db_commands,
    initialize,
    key_rotation,
    project_commands,
    serve,
    token_commands,
)
from llm_proxy.ops.cli.arguments import CommandParser
from llm_proxy.ops.command_errors import EXIT_FAILED, EXIT_USAGE, CommandError
from llm_proxy.ops.control_characters import escape_controls

# In the order `llm-proxy --help` lists them.
_JOBS = (serve, initialize, project_commands, token_commands, audit_commands, db_commands, key_rotation)


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    for line in message.split("\n"):  # a message may quote the gateway's answer: it must not drive the terminal
        print(f"llm-proxy: {escape_controls(line)}", file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every command."""
    parser = CommandParser(prog="llm-proxy", description="OpenAI-compatible gateway with short-lived tokens.",
                           epilog="Run `llm-proxy COMMAND --help` for the options of a command.")
    parser.add_argument("--version", action="version", version=f"llm-proxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=CommandParser)
    for job in _JOBS:
        job.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `llm-proxy` console script."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return int(args.run(args))
    except CommandError as exc:
        return _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted")
    except Exception as exc:  # never a traceback, and never a secret an exception message might hold
        first_line = next(iter(mask_secrets(str(exc)).splitlines()), "")
        return _fail(f"unexpected error ({type(exc).__name__}) {first_line}".rstrip())

"""`llm-proxy project …`: create, list, show and change projects on a running gateway."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from pathlib import Path
from typing import Any

from llm_proxy.models import PROJECT_FIELDS
from llm_proxy.ops.cli.arguments import add_command, add_group, json_option
from llm_proxy.ops.cli.gateway_client import call, connection_options
from llm_proxy.ops.cli.output import show, show_list
from llm_proxy.ops.command_errors import EXIT_OK, UsageError

PROJECT_COLUMNS = ("id", "name", "is_active", "api_key", "created_at")


def _read_api_key(source: str | None) -> str:
    """Read an upstream key from a file, stdin (`-`, or piped), or a hidden prompt: never from argv."""
    try:
        if source is not None and source != "-":
            raw = Path(source).read_text(encoding="utf-8")
        elif source is None and sys.stdin.isatty():
            raw = getpass.getpass("Upstream API key: ")
        else:
            raw = sys.stdin.readline()
    except OSError as exc:
        raise UsageError(f"--api-key-file: cannot read {source or 'stdin'} ({exc.strerror or exc})") from None
    except UnicodeDecodeError:  # the message would quote the key's bytes
        raise UsageError(f"--api-key-file: {source or 'stdin'} is not UTF-8 text") from None
    key = raw.strip()
    if not key:
        raise UsageError("no API key given (use --api-key-file FILE, or pipe it on stdin)")
    return key


def cmd_project_create(args: argparse.Namespace) -> int:
    """Create a project; its upstream API key is read from --api-key-file, stdin or a prompt."""
    body = {"name": args.name, "api_key": _read_api_key(args.api_key_file)}
    show(args, asyncio.run(call(args, "POST", "/projects", body=body)), PROJECT_FIELDS)
    return EXIT_OK


def cmd_project_list(args: argparse.Namespace) -> int:
    """List projects, oldest first."""
    query = {} if args.active is None else {"active": "true" if args.active else "false"}
    show_list(args, asyncio.run(call(args, "GET", "/projects", query=query)), PROJECT_COLUMNS)
    return EXIT_OK


def cmd_project_get(args: argparse.Namespace) -> int:
    """Show one project."""
    show(args, asyncio.run(call(args, "GET", f"/projects/{args.id}")), PROJECT_FIELDS)
    return EXIT_OK


def cmd_project_update(args: argparse.Namespace) -> int:
    """Rename a project, replace its upstream key, or (de)activate it."""
    body: dict[str, Any] = {}
    if args.name is not None:
        body["name"] = args.name
    if args.api_key_file is not None:
        body["api_key"] = _read_api_key(args.api_key_file)
    if args.active is not None:
        body["is_active"] = args.active
    if not body:
        raise UsageError("project update: give at least one of --name, --api-key-file, --activate, --deactivate")
    show(args, asyncio.run(call(args, "PATCH", f"/projects/{args.id}", body=body)), PROJECT_FIELDS)
    return EXIT_OK


def add_commands(commands: Any) -> None:
    """Add `project` and its subcommands."""
    api = (connection_options(), json_option())
    projects = add_group(commands, "project", "manage projects on a running gateway")
    create = add_command(projects, "create", cmd_project_create, "create a project", api)
    create.add_argument("name")
    create.add_argument("--api-key-file", metavar="FILE",
                        help="read the upstream API key from FILE (`-` = stdin; default: prompt, or stdin if piped)")
    listing = add_command(projects, "list", cmd_project_list, "list projects", api)
    state = listing.add_mutually_exclusive_group()
    state.add_argument("--active", dest="active", action="store_const", const=True, help="only active projects")
    state.add_argument("--inactive", dest="active", action="store_const", const=False, help="only inactive ones")
    add_command(projects, "get", cmd_project_get, "show a project", api).add_argument("id")
    update = add_command(projects, "update", cmd_project_update, "change a project", api)
    update.add_argument("id")
    update.add_argument("--name")
    update.add_argument("--api-key-file", metavar="FILE", help="replace the upstream key with FILE's (`-` = stdin)")
    state = update.add_mutually_exclusive_group()
    state.add_argument("--activate", dest="active", action="store_const", const=True)
    state.add_argument("--deactivate", dest="active", action="store_const", const=False)

"""`llm-proxy token …`: issue, list, show, revoke and refresh client tokens on a running gateway."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Iterable
from typing import Any

from llm_proxy.models import TOKEN_FIELDS
from llm_proxy.ops.cli.arguments import add_command, add_group, json_option, non_negative, positive
from llm_proxy.ops.cli.gateway_client import call, connection_options
from llm_proxy.ops.cli.output import format_record, print_json, show, show_list
from llm_proxy.ops.command_errors import EXIT_OK, UsageError
from llm_proxy.ops.control_characters import escape_controls

TOKEN_COLUMNS = ("id", "project_id", "token_hint", "is_active", "expires_at", "request_count", "max_requests",
                 "last_used_at")


def _show_new_token(args: argparse.Namespace, document: dict[str, Any]) -> None:
    if args.json:
        print_json(document)
        return
    print(format_record(document, TOKEN_FIELDS))
    print(f"\ntoken: {escape_controls(str(document.get('token')))}")
    print("This is the only time the token is shown; store it now.", file=sys.stderr)


def _limits(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def cmd_token_create(args: argparse.Namespace) -> int:
    """Issue a token for a project and print it (the only time it is shown)."""
    body = {"project_id": args.project_id, **_limits(args, ("duration_minutes", "max_requests",
                                                            "rate_limit_per_minute", "max_tokens_total"))}
    _show_new_token(args, asyncio.run(call(args, "POST", "/tokens", body=body)))
    return EXIT_OK


def cmd_token_list(args: argparse.Namespace) -> int:
    """List tokens (never their plaintext), oldest first."""
    query = {}
    if args.project is not None:
        query["project_id"] = args.project
    if args.active_only:
        query["active_only"] = "true"
    show_list(args, asyncio.run(call(args, "GET", "/tokens", query=query)), TOKEN_COLUMNS)
    return EXIT_OK


def cmd_token_get(args: argparse.Namespace) -> int:
    """Show one token."""
    show(args, asyncio.run(call(args, "GET", f"/tokens/{args.id}")), TOKEN_FIELDS)
    return EXIT_OK


def cmd_token_revoke(args: argparse.Namespace) -> int:
    """Revoke one token by id, or every token of a project with --project."""
    if (args.id is None) == (args.project is None):
        raise UsageError("token revoke: give either a token ID or --project PROJECT_ID")
    if args.project is not None:
        document = asyncio.run(call(args, "POST", f"/projects/{args.project}/tokens/revoke"))
        if args.json:
            print_json(document)
        else:
            print(f"revoked {document['revoked_count']} token(s) of project {args.project} "
                  f"({document['already_revoked_count']} already revoked, {document['total_tokens']} in total)")
        return EXIT_OK
    asyncio.run(call(args, "DELETE", f"/tokens/{args.id}"))
    if args.json:
        print_json({"id": args.id, "revoked": True})
    else:
        print(f"revoked token {args.id}")
    return EXIT_OK


def cmd_token_refresh(args: argparse.Namespace) -> int:
    """Issue a successor with the same project and limits; the old token stops after --grace-seconds."""
    body = _limits(args, ("duration_minutes", "grace_seconds"))
    _show_new_token(args, asyncio.run(call(args, "POST", f"/tokens/{args.id}/refresh", body=body)))
    return EXIT_OK


def add_commands(commands: Any) -> None:
    """Add `token` and its subcommands."""
    api = (connection_options(), json_option())
    tokens = add_group(commands, "token", "manage client tokens on a running gateway")
    create = add_command(tokens, "create", cmd_token_create, "issue a token", api)
    create.add_argument("project_id")
    create.add_argument("--duration", dest="duration_minutes", type=positive, metavar="MINUTES",
                        help="lifetime (default: DEFAULT_TOKEN_DURATION_MINUTES of the gateway)")
    create.add_argument("--max-requests", type=non_negative, metavar="N", help="lifetime request quota")
    create.add_argument("--rate-limit", dest="rate_limit_per_minute", type=non_negative, metavar="N",
                        help="requests per minute (0 = unlimited; default: the gateway's)")
    create.add_argument("--max-tokens-total", type=non_negative, metavar="N", help="usage budget in model tokens")
    listing = add_command(tokens, "list", cmd_token_list, "list tokens", api)
    listing.add_argument("--project", metavar="PROJECT_ID", help="only this project's tokens")
    listing.add_argument("--active-only", action="store_true", help="leave out revoked, inactive and expired ones")
    add_command(tokens, "get", cmd_token_get, "show a token", api).add_argument("id")
    revoke = add_command(tokens, "revoke", cmd_token_revoke, "revoke a token (or all of a project's)", api)
    revoke.add_argument("id", nargs="?")
    revoke.add_argument("--project", metavar="PROJECT_ID", help="revoke every token of this project")
    refresh = add_command(tokens, "refresh", cmd_token_refresh, "replace a token with a new one", api)
    refresh.add_argument("id")
    refresh.add_argument("--duration", dest="duration_minutes", type=positive, metavar="MINUTES")
    refresh.add_argument("--grace-seconds", type=non_negative, metavar="N",
                         help="keep the old token working this long (default: 0)")

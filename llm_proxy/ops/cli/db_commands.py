"""`llm-proxy db …`: the schema's state and its migrations, and a copy from one database to another."""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from llm_proxy.ops.cli.arguments import add_command, add_group, json_option, positive
from llm_proxy.ops.cli.configuration import command_settings, configuration_error
from llm_proxy.ops.cli.output import format_record, format_table, print_json
from llm_proxy.ops.command_errors import EXIT_FAILED, EXIT_OK, CommandError, UsageError
from llm_proxy.ops.control_characters import escape_controls
from llm_proxy.settings import ConfigError, read_client_variable
from llm_proxy.storage.errors import StorageError
from llm_proxy.storage.factory import (
    COPIED_TABLES,
    CopyResult,
    Database,
    SchemaStatus,
    TargetNotEmpty,
    copy_database,
    database_variable,
    migrate_schema,
    parse_database,
    schema_status,
    settings_database,
    show_database,
)

T = TypeVar("T")
# The password in a URL's user info: what a usage error quoting a stray argument must not show.
_URL_PASSWORD = re.compile(r"(://[^/@\s:]*:)[^@\s]*@")


def _first_line(exc: Exception) -> str:
    """The driver's message without its DETAIL lines (which may quote a whole row)."""
    return next(iter(str(exc).splitlines()), type(exc).__name__)


def _gateway_database() -> tuple[Database, str]:
    """The database the gateway's configuration names, and the variable naming it."""
    settings = command_settings()
    return settings_database(settings), database_variable(settings)


def _run(database: Database, variable: str, work: Coroutine[Any, Any, T]) -> T:
    """Run work; a storage failure becomes one line naming the variable and the database (never its password)."""
    try:
        return asyncio.run(work)
    except ConfigError as exc:  # PostgreSQL without its driver installed
        raise configuration_error(exc) from None
    except StorageError as exc:
        raise CommandError(f"{variable}: cannot use {show_database(database)} ({_first_line(exc)})") from None


def _schema_line(status: SchemaStatus) -> str:
    if status.unknown:
        return (f"migrated by a newer llm-proxy (version {', '.join(map(str, status.unknown))} unknown here): "
                "upgrade llm-proxy")
    if not status.exists:
        return "no database yet: `llm-proxy db migrate` (or `serve`) creates it"
    if status.pending:
        return f"{len(status.pending)} migration(s) pending: run `llm-proxy db migrate`"
    return f"up to date (version {status.known[-1][0]})"


def _served_by(status: SchemaStatus) -> str:
    if not status.served_by_known:
        return "unknown (this system cannot tell without taking the lock)"
    return status.served_by or "nobody"


def cmd_db_status(args: argparse.Namespace) -> int:
    """Show the database's backend, its migrations (applied, with when, and pending) and who serves it;
    exit 1 while its schema is not up to date."""
    database, variable = _gateway_database()
    status = _run(database, variable, schema_status(database, variable))
    names = dict(status.known)
    applied = [{"version": version, "name": names.get(version), "applied_at": at}
               for version, at in sorted(status.applied.items())]
    pending = [{"version": version, "name": name} for version, name in status.pending]
    if args.json:
        print_json({"backend": status.backend, "database": status.database, "exists": status.exists,
                    "served_by": status.served_by if status.served_by_known else "unknown",
                    "up_to_date": status.up_to_date, "latest": status.known[-1][0],
                    "applied": applied, "pending": pending, "unknown": status.unknown})
    else:
        print(format_record({"backend": status.backend, "database": status.database,
                             "served by": _served_by(status), "schema": _schema_line(status)},
                            ("backend", "database", "served by", "schema")))
        print()
        print(format_table(("version", "name", "applied"), [
            *((row["version"], row["name"] or "(unknown)", row["applied_at"]) for row in applied),
            *((row["version"], row["name"], "pending") for row in pending)]))
    return EXIT_OK if status.up_to_date else EXIT_FAILED


def cmd_db_migrate(args: argparse.Namespace) -> int:
    """Apply the migrations the database lacks (each once, under a lock; a serving gateway may run beside)."""
    database, variable = _gateway_database()
    applied = _run(database, variable, migrate_schema(database, variable))
    shown = show_database(database)
    if args.json:
        print_json({"database": shown, "applied": [{"version": version, "name": name} for version, name in applied]})
    elif applied:
        print(f"applied {len(applied)} migration(s) to {shown}: "
              f"{', '.join(f'{version} {name}' for version, name in applied)}")
    else:
        print(f"{shown} is up to date: nothing to apply")
    return EXIT_OK


def _masked(text: str) -> str:
    return _URL_PASSWORD.sub(r"\1***@", text)


def _copy_end(text: str, option: str) -> Database:
    """A copy's end from its option: a URL, or `env:NAME` for the URL in that variable (or `.env`), which keeps
    a password out of the process list and the shell's history."""
    if text.startswith("env:"):
        name = text.removeprefix("env:")
        value = read_client_variable(name) if name.isidentifier() else None
        if value is None:
            raise UsageError(f"{option} {text}: no variable {name} in the environment or .env")
        text = value
    try:
        return parse_database(text, option)
    except ConfigError as exc:
        raise UsageError("\n".join(f"{variable}: {problem}" for variable, problem in exc.problems)) from None


async def _copy(source: Database, target: Database, batch_size: int) -> CopyResult:
    served_by = (await schema_status(source, "--from")).served_by
    if served_by is not None:
        # Not refused (the copy is of one moment, and sound), but what the server has not flushed yet and
        # writes from now on will not be in it.
        print(escape_controls(f"llm-proxy: warning: {show_database(source)} is served by {served_by}: what it "
                              "writes from now on is not in the copy; stop it first"), file=sys.stderr)
    return await copy_database(source, target, batch_size=batch_size)


def cmd_db_copy(args: argparse.Namespace) -> int:
    """Copy projects, tokens, usage and audit events (and the chain's head) into an empty database, in one
    transaction; stop the gateway first, so nothing it writes afterwards is left behind."""
    if args.stray:
        raise UsageError(f"db copy: unrecognized arguments: {_masked(' '.join(args.stray))} "
                         "(see `llm-proxy db copy --help`)")
    source, target = _copy_end(args.source, "--from"), _copy_end(args.target, "--to")
    shown_source, shown_target = show_database(source), show_database(target)
    try:
        result = asyncio.run(_copy(source, target, args.batch_size))
    except ConfigError as exc:  # PostgreSQL without its driver installed
        raise UsageError("\n".join(f"{variable}: {problem}" for variable, problem in exc.problems)) from None
    except TargetNotEmpty as exc:
        raise CommandError(f"db copy: the target {exc}: it copies only into an empty database, and changed "
                           "nothing") from None
    except StorageError as exc:
        raise CommandError(f"db copy from {shown_source} to {shown_target} failed, and the target was left as "
                           f"it was: {_first_line(exc)}") from None
    if args.json:
        print_json({"from": shown_source, "to": shown_target, "rows": result.rows})
        return EXIT_OK
    print(f"copied {shown_source} to {shown_target}:")
    print(format_table(("table", "rows"), [(table, result.rows[table]) for table in COPIED_TABLES]))
    print("check it: llm-proxy audit verify --db, with the target's DATABASE_URL or DATABASE_PATH")
    return EXIT_OK


def add_commands(commands: Any) -> None:
    """Add `db status`, `db migrate` and `db copy`."""
    output = json_option()
    db = add_group(commands, "db", "the database's schema, and copying it (on the gateway's host)")
    add_command(db, "status", cmd_db_status, "show the schema's migrations and who serves the database", (output,))
    add_command(db, "migrate", cmd_db_migrate, "apply pending migrations", (output,))
    copy = add_command(db, "copy", cmd_db_copy, "copy everything into an empty database", (output,))
    copy.add_argument("--from", dest="source", required=True, metavar="URL",
                      help="sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DB, or env:NAME for the URL in "
                           "that variable (keeps a password out of `ps` and the shell history)")
    copy.add_argument("--to", dest="target", required=True, metavar="URL", help="an empty database, as --from")
    copy.add_argument("--batch-size", type=positive, default=1000, metavar="N", help="rows per batch")
    # A usage error quotes what it could not use, and here that may be a URL holding a password: stray
    # arguments are caught rather than left to the top parser, and this parser's errors are masked.
    copy.add_argument("stray", nargs="*", help=argparse.SUPPRESS)
    error = copy.error
    copy.error = lambda message: error(_masked(message))  # type: ignore[method-assign]

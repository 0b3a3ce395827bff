"""`llm-proxy audit …`: verify the audit hash chain of the files or the table, and prune old rows."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from llm_proxy.audit.chain import TABLE, Break, ChainsResult, chain_name
from llm_proxy.audit.files import audit_files
from llm_proxy.audit.verify import prune, verify_files, verify_table
from llm_proxy.audit.writer import AuditWriter
from llm_proxy.ops.cli.arguments import add_command, add_group, json_option, non_negative, positive
from llm_proxy.ops.cli.configuration import command_settings, configuration_error
from llm_proxy.ops.cli.local_database import with_database, with_store
from llm_proxy.ops.cli.output import print_json
from llm_proxy.ops.command_errors import EXIT_FAILED, EXIT_OK, CommandError, UsageError
from llm_proxy.settings import ConfigError, Settings
from llm_proxy.storage.base import ChainHead, PruneResult, Store
from llm_proxy.storage.errors import StorageError
from llm_proxy.storage.factory import database_variable, describe_database, is_postgres, peek_audit_heads


def cmd_audit_prune(args: argparse.Namespace) -> int:
    """Delete audit rows older than N days in batches; record the prune as an audit.prune event."""
    settings = command_settings()
    days = settings.audit_retention_days if args.older_than_days is None else args.older_than_days

    async def work(store: Store, audit: AuditWriter) -> PruneResult:
        try:
            result = await prune(store.audit, days, args.batch_size)
        except Exception:
            audit.emit("audit.prune", actor="system", result="error",
                        details={"older_than_days": days, "batch_size": args.batch_size})
            raise
        audit.emit("audit.prune", actor="system", result="success",
                   details={**result.details(), "older_than_days": days, "batch_size": args.batch_size})
        return result

    result = asyncio.run(with_database(settings, work))
    if args.json:
        print_json({**result.details(), "batches": result.batches, "older_than_days": days})
    else:
        print(f"pruned {result.deleted} audit event(s) older than {days} day(s) in {result.batches} batch(es)")
    return EXIT_OK


def _problem_document(problem: Break | None) -> dict[str, Any] | None:
    if problem is None:
        return None
    return {"kind": problem.kind, "where": problem.where, "seq": problem.seq, "message": problem.message}


def _result_document(result: ChainsResult) -> dict[str, Any]:
    return {"ok": result.ok, "events": result.events, "message": result.describe(),
            "problem": _problem_document(result.problem),
            "chains": {instance: {"ok": chain.ok, "events": chain.events, "start": chain.start,
                                  "first_seq": chain.first_seq, "last_seq": chain.last_seq,
                                  "message": chain.describe(), "problem": _problem_document(chain.problem)}
                       for instance, chain in result.chains.items()},
            "absent": list(result.absent)}


async def _verify_db(settings: Settings) -> ChainsResult:
    async def verify(store: Store) -> ChainsResult:
        # The heads are read first: events a gateway appends meanwhile are accepted when they chain on.
        heads = await store.audit.heads() if settings.audit_store_in_db else None
        return await verify_table(store.audit, heads=heads, growing=True)

    return await with_store(settings, verify)


def _files_chain_heads(settings: Settings) -> tuple[dict[str, ChainHead] | None, str]:
    """Return the database's chain heads (None if unavailable) and a note for the operator saying which."""
    unchecked = "newest lines removed from the files would go unnoticed"
    database = describe_database(settings)
    variable = database_variable(settings)
    if not is_postgres(settings) and not settings.database_path.is_file():
        return None, f"no database at {database} ({variable}): files verified alone, {unchecked}"
    try:
        heads = peek_audit_heads(settings)
    except ConfigError as exc:  # PostgreSQL without its driver installed
        raise configuration_error(exc) from None
    except StorageError as exc:
        return None, (f"database at {database} unreadable ({type(exc).__name__}): files verified alone, "
                      f"{unchecked}")
    if not heads:
        return None, f"no audit chain in {database}: files verified alone, {unchecked}"
    shown = ", ".join(f"{instance or '(no instance)'} at seq {seq}" for instance, (seq, _) in sorted(heads.items()))
    return heads, f"checked up to the database's chain heads: {shown}"


def _absent_note(result: ChainsResult) -> str:
    if not result.absent:
        return ""
    return (f"; not in these files, so not checked here: {', '.join(chain_name(name) for name in result.absent)} "
            "(another host's files, or `audit verify --db`)")


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Check every audit hash chain of files (default: AUDIT_LOG_FILE and rotated siblings) or, with --db, the table."""
    outcomes: dict[str, ChainsResult] = {}
    notes: dict[str, str] = {}
    if args.files:
        paths = [Path(name) for name in args.files]
        for path in paths:
            if not path.is_file():
                raise UsageError(f"no audit file at {path}")
        outcomes["files"] = verify_files(paths)
    elif not args.db:
        settings = command_settings()
        if settings.audit_log_file is None:
            raise UsageError("AUDIT_LOG_FILE is empty: there are no audit files (use --db)")
        paths = audit_files(settings.audit_log_file)
        if not paths:
            raise CommandError(f"no audit files at {settings.audit_log_file}")
        # Read before the files, so a gateway writing meanwhile only adds lines past them.
        heads, heads_note = _files_chain_heads(settings)
        outcomes["files"] = verify_files(paths, heads=heads, growing=True)
        notes["files"] = heads_note + _absent_note(outcomes["files"])
    if args.db:
        outcomes["db"] = asyncio.run(_verify_db(command_settings()))
    if args.json:
        print_json({name: {**_result_document(result), **({"note": notes[name]} if name in notes else {})}
                    for name, result in outcomes.items()})
    else:
        labels = {"files": "files", "db": TABLE}
        for name, result in outcomes.items():
            print(f"{labels[name]}: {result.describe()}{f'; {notes[name]}' if name in notes else ''}")
            for line in result.chain_lines():
                print(f"  {line}")
    return EXIT_OK if all(result.ok for result in outcomes.values()) else EXIT_FAILED


def add_commands(commands: Any) -> None:
    """Add `audit prune` and `audit verify`."""
    output = json_option()
    audit = add_group(commands, "audit", "check and prune the audit trail (on the gateway's host)")
    prune = add_command(audit, "prune", cmd_audit_prune, "delete old audit rows", (output,))
    prune.add_argument("--older-than-days", type=non_negative, metavar="N",
                       help="default: AUDIT_RETENTION_DAYS")
    prune.add_argument("--batch-size", type=positive, default=1000, metavar="N", help="rows per transaction")
    verify = add_command(audit, "verify", cmd_audit_verify, "verify the audit hash chains (one per instance)",
                         (output,))
    verify.add_argument("files", nargs="*", metavar="FILE", help="audit files, rotated ones included (.gz too)")
    verify.add_argument("--db", action="store_true", help="verify the audit_events table")

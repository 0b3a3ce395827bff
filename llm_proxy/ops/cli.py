"""The `llm-proxy` command: serve the gateway, create secrets, operate a running gateway and its database."""

from __future__ import annotations

import argparse
import asyncio
import gc
import getpass
import logging
import os
import re
import ssl
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
from aiohttp import web

from llm_proxy import __version__
from llm_proxy.app import CONNECTION_IDLE_TIMEOUT, create_app
from llm_proxy.audit import chain as auditchain
from llm_proxy.audit.writer import AuditWriter
from llm_proxy.crypto import DecryptionError, KeyRing
from llm_proxy.models import PROJECT_FIELDS, TOKEN_FIELDS
from llm_proxy.ops.control_characters import escape_controls
from llm_proxy.ops.logs import ACCESS_LOGGER, AccessLogger, configure_logging, mask_secrets
from llm_proxy.settings import ConfigError, Settings, load_settings, read_client_variable
from llm_proxy.storage.base import PruneResult, Store
from llm_proxy.storage.errors import StorageError
from llm_proxy.storage.factory import open_store, peek_audit_head
from llm_proxy.tokens.credentials import generate_encryption_key, generate_secret

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_URL = "http://127.0.0.1:8080"
T = TypeVar("T")
log = logging.getLogger("llm_proxy")


class CommandError(Exception):
    """A command failed; str() is the one line shown to the operator."""

    exit_code = EXIT_FAILED


class UsageError(CommandError):
    """The command line or the configuration is wrong."""

    exit_code = EXIT_USAGE


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    for line in message.split("\n"):  # a message may quote the gateway's answer: it must not drive the terminal
        print(f"llm-proxy: {escape_controls(line)}", file=sys.stderr)
    return code


def _configuration_error(exc: ConfigError) -> UsageError:
    """Return the failure that shows each of the error's problems as its own `configuration error:` line."""
    return UsageError("\n".join(f"configuration error: {variable}: {problem}" for variable, problem in exc.problems))


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        raise _configuration_error(exc) from None


# ---- output ----

def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    # A stored name may hold ESC or U+009B (CSI): printed raw, it would drive the operator's terminal.
    return escape_controls(str(value))


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Return rows as left-aligned columns under upper-case headers, two spaces apart, controls escaped."""
    cells = [[header.upper() for header in headers], *([_cell(value) for value in row] for row in rows)]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headers))]
    return "\n".join("  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def format_record(document: dict[str, Any], fields: Sequence[str]) -> str:
    """Return one object as aligned `field  value` lines, controls escaped."""
    width = max(len(field) for field in fields)
    return "\n".join(f"{field.ljust(width)}  {_cell(document.get(field))}".rstrip() for field in fields)


def _print_json(document: Any) -> None:
    print(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())


PROJECT_COLUMNS = ("id", "name", "is_active", "api_key", "created_at")
TOKEN_COLUMNS = ("id", "project_id", "token_hint", "is_active", "expires_at", "request_count", "max_requests",
                 "last_used_at")


def _show(args: argparse.Namespace, document: Any, fields: Sequence[str]) -> None:
    if args.json:
        _print_json(document)
    else:
        print(format_record(document, fields))


def _show_list(args: argparse.Namespace, document: Any, columns: Sequence[str]) -> None:
    if args.json:
        _print_json(document)
    else:
        rows = document.get("data", []) if isinstance(document, dict) else []
        print(format_table(columns, ([row.get(column) for column in columns] for row in rows)))


def _show_new_token(args: argparse.Namespace, document: dict[str, Any]) -> None:
    if args.json:
        _print_json(document)
        return
    print(format_record(document, TOKEN_FIELDS))
    print(f"\ntoken: {escape_controls(str(document.get('token')))}")
    print("This is the only time the token is shown; store it now.", file=sys.stderr)


# ---- talking to a running gateway ----

def _management_token(args: argparse.Namespace) -> str:
    if args.token_file is not None:
        try:
            raw = Path(args.token_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"--token-file: cannot read {args.token_file} ({exc.strerror})") from None
        except UnicodeDecodeError:  # the message would quote the file's bytes: a secret, perhaps
            raise UsageError(f"--token-file: {args.token_file} is not UTF-8 text") from None
    else:
        raw = read_client_variable("MANAGEMENT_TOKEN") or ""
    # MANAGEMENT_TOKEN may list several accepted tokens; any one of them will do.
    token = next((item.strip() for item in raw.strip().split(",") if item.strip()), None)
    if token is None:
        raise UsageError("no management token: set MANAGEMENT_TOKEN (environment or .env) or pass --token-file")
    return token


def _base_url(args: argparse.Namespace) -> str:
    url = (args.url or read_client_variable("LLM_PROXY_URL") or DEFAULT_URL).rstrip("/")
    if not re.fullmatch(r"https?://[^/\s?#@]+(/[^\s?#]*)?", url):
        raise UsageError("--url must be an http:// or https:// URL such as http://127.0.0.1:8080")
    return url


def _error_line(status: int, body: bytes, location: str | None) -> str:
    if 300 <= status < 400:
        # Followed blindly, a redirect would resend the management token (and a DELETE) elsewhere.
        where = f" to {mask_secrets(location)}; use that URL (--url)" if location else ""
        return f"the gateway answered HTTP {status}: it redirected{where}"
    try:
        error = orjson.loads(body)["error"]
        message, code = str(error["message"]), error.get("code")
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return f"the gateway answered HTTP {status}"
    return f"HTTP {status}{f' {code}' if code else ''}: {mask_secrets(message)}"


async def _call(args: argparse.Namespace, method: str, path: str, *, body: dict[str, Any] | None = None,
                query: dict[str, str] | None = None) -> Any:
    """Send one management request; return its decoded JSON (None for an empty answer) or raise CommandError."""
    url, token = _base_url(args), _management_token(args)
    ssl_option: ssl.SSLContext | bool = True
    if args.cafile is not None:
        try:
            ssl_option = ssl.create_default_context(cafile=args.cafile)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"--cafile: cannot load {args.cafile} ({type(exc).__name__})") from None
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    headers = {"Authorization": f"Bearer {token}", "User-Agent": f"llm-proxy-cli/{__version__}"}
    try:
        async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session, session.request(
                method, url + "/manage" + path, json=body, params=query, ssl=ssl_option,
                allow_redirects=False) as response:
            data = await response.read()
            status, location = response.status, response.headers.get("Location")
    except aiohttp.ClientConnectorCertificateError:
        raise CommandError(f"the certificate of {url} is not trusted (pass --cafile)") from None
    except aiohttp.ClientConnectorError as exc:
        reason = exc.os_error.strerror or type(exc.os_error).__name__
        raise CommandError(f"cannot connect to the gateway at {url}: {reason}") from None
    except TimeoutError:
        raise CommandError(f"the gateway at {url} did not answer within {args.timeout:g}s") from None
    except aiohttp.ClientError as exc:
        raise CommandError(f"request to the gateway at {url} failed ({type(exc).__name__})") from None
    if not 200 <= status < 300:
        raise CommandError(_error_line(status, data, location))
    if not data:
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise CommandError(f"the gateway answered HTTP {status} with a body that is not JSON") from None


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
    _show(args, asyncio.run(_call(args, "POST", "/projects", body=body)), PROJECT_FIELDS)
    return EXIT_OK


def cmd_project_list(args: argparse.Namespace) -> int:
    """List projects, oldest first."""
    query = {} if args.active is None else {"active": "true" if args.active else "false"}
    _show_list(args, asyncio.run(_call(args, "GET", "/projects", query=query)), PROJECT_COLUMNS)
    return EXIT_OK


def cmd_project_get(args: argparse.Namespace) -> int:
    """Show one project."""
    _show(args, asyncio.run(_call(args, "GET", f"/projects/{args.id}")), PROJECT_FIELDS)
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
    _show(args, asyncio.run(_call(args, "PATCH", f"/projects/{args.id}", body=body)), PROJECT_FIELDS)
    return EXIT_OK


def _limits(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def cmd_token_create(args: argparse.Namespace) -> int:
    """Issue a token for a project and print it (the only time it is shown)."""
    body = {"project_id": args.project_id, **_limits(args, ("duration_minutes", "max_requests",
                                                            "rate_limit_per_minute", "max_tokens_total"))}
    _show_new_token(args, asyncio.run(_call(args, "POST", "/tokens", body=body)))
    return EXIT_OK


def cmd_token_list(args: argparse.Namespace) -> int:
    """List tokens (never their plaintext), oldest first."""
    query = {}
    if args.project is not None:
        query["project_id"] = args.project
    if args.active_only:
        query["active_only"] = "true"
    _show_list(args, asyncio.run(_call(args, "GET", "/tokens", query=query)), TOKEN_COLUMNS)
    return EXIT_OK


def cmd_token_get(args: argparse.Namespace) -> int:
    """Show one token."""
    _show(args, asyncio.run(_call(args, "GET", f"/tokens/{args.id}")), TOKEN_FIELDS)
    return EXIT_OK


def cmd_token_revoke(args: argparse.Namespace) -> int:
    """Revoke one token by id, or every token of a project with --project."""
    if (args.id is None) == (args.project is None):
        raise UsageError("token revoke: give either a token ID or --project PROJECT_ID")
    if args.project is not None:
        document = asyncio.run(_call(args, "POST", f"/projects/{args.project}/tokens/revoke"))
        if args.json:
            _print_json(document)
        else:
            print(f"revoked {document['revoked_count']} token(s) of project {args.project} "
                  f"({document['already_revoked_count']} already revoked, {document['total_tokens']} in total)")
        return EXIT_OK
    asyncio.run(_call(args, "DELETE", f"/tokens/{args.id}"))
    if args.json:
        _print_json({"id": args.id, "revoked": True})
    else:
        print(f"revoked token {args.id}")
    return EXIT_OK


def cmd_token_refresh(args: argparse.Namespace) -> int:
    """Issue a successor with the same project and limits; the old token stops after --grace-seconds."""
    body = _limits(args, ("duration_minutes", "grace_seconds"))
    _show_new_token(args, asyncio.run(_call(args, "POST", f"/tokens/{args.id}/refresh", body=body)))
    return EXIT_OK


# ---- working on the local database and audit files ----

async def _with_database(settings: Settings, work: Callable[[Store, AuditWriter], Awaitable[T]]) -> T:
    """Open the gateway's store and an audit writer (actor `system`), run work(store, audit), close both."""
    if not settings.database_path.is_file():
        raise UsageError(f"DATABASE_PATH: no database at {settings.database_path}")
    store = open_store(settings)
    try:
        await store.open()
        audit = AuditWriter(store.audit, enabled=settings.audit_enabled, file_path=settings.audit_log_file,
                            create_dir=settings.audit_create_dir, store_in_db=settings.audit_store_in_db,
                            mask_client_ip=settings.audit_mask_client_ip)
        try:
            try:
                await audit.start()
            except OSError as exc:
                raise CommandError(f"AUDIT_LOG_FILE: cannot open {settings.audit_log_file} ({exc.strerror})") from None
            return await work(store, audit)
        finally:
            await audit.close()
    except StorageError as exc:
        raise CommandError(f"database error at {settings.database_path}: {exc}") from None
    finally:
        await store.close()


def cmd_rotate_key(args: argparse.Namespace) -> int:
    """Re-encrypt every stored upstream key under ENCRYPTION_KEY, reading old ones with ENCRYPTION_KEY_PREVIOUS."""
    settings = _settings()
    keyring = KeyRing(settings.encryption_key, settings.encryption_keys_previous)

    def reencrypt(stored: str) -> str | None:
        return None if keyring.is_current(stored) else keyring.encrypt(keyring.decrypt(stored))

    async def work(store: Store, audit: AuditWriter) -> int:
        try:
            count = await store.projects.rekey(reencrypt)
        except DecryptionError:
            audit.emit("key.rotate", actor="system", result="failure", details={"reason": "undecryptable_key"})
            raise CommandError("a stored API key opens with neither ENCRYPTION_KEY nor ENCRYPTION_KEY_PREVIOUS; "
                               "nothing was changed") from None
        audit.emit("key.rotate", actor="system", result="success", details={"reencrypted": count})
        return count

    count = asyncio.run(_with_database(settings, work))
    if args.json:
        _print_json({"reencrypted": count})
    else:
        print(f"re-encrypted {count} project key(s) under the current ENCRYPTION_KEY")
    return EXIT_OK


def cmd_audit_prune(args: argparse.Namespace) -> int:
    """Delete audit rows older than N days in batches; record the prune as an audit.prune event."""
    settings = _settings()
    days = settings.audit_retention_days if args.older_than_days is None else args.older_than_days

    async def work(store: Store, audit: AuditWriter) -> PruneResult:
        try:
            result = await auditchain.prune(store.audit, days, args.batch_size)
        except Exception:
            audit.emit("audit.prune", actor="system", result="error",
                        details={"older_than_days": days, "batch_size": args.batch_size})
            raise
        audit.emit("audit.prune", actor="system", result="success",
                   details={**result.details(), "older_than_days": days, "batch_size": args.batch_size})
        return result

    result = asyncio.run(_with_database(settings, work))
    if args.json:
        _print_json({**result.details(), "batches": result.batches, "older_than_days": days})
    else:
        print(f"pruned {result.deleted} audit event(s) older than {days} day(s) in {result.batches} batch(es)")
    return EXIT_OK


def _result_document(result: auditchain.VerifyResult) -> dict[str, Any]:
    problem = result.problem
    return {"ok": result.ok, "events": result.events, "start": result.start, "first_seq": result.first_seq,
            "last_seq": result.last_seq, "message": result.describe(),
            "problem": None if problem is None else {"kind": problem.kind, "where": problem.where,
                                                     "seq": problem.seq, "message": problem.message}}


async def _verify_db(settings: Settings) -> auditchain.VerifyResult:
    if not settings.database_path.is_file():
        raise UsageError(f"DATABASE_PATH: no database at {settings.database_path}")
    store = open_store(settings)
    try:
        await store.open()
        # The head is read first: events a gateway appends meanwhile are accepted when they chain on.
        head = await store.audit.head() if settings.audit_store_in_db else None
        return await auditchain.verify_table(store.audit, head=head, growing=True)
    except StorageError as exc:
        raise CommandError(f"database error at {settings.database_path}: {exc}") from None
    finally:
        await store.close()


def _files_chain_head(settings: Settings) -> tuple[tuple[int, str] | None, str]:
    """Return the database's chain head (None if unavailable) and a note for the operator saying which."""
    unchecked = "newest lines removed from the files would go unnoticed"
    database = settings.database_path
    if not database.is_file():
        return None, f"no database at {database} (DATABASE_PATH): files verified alone, {unchecked}"
    try:
        head = peek_audit_head(settings)
    except StorageError as exc:
        return None, (f"database at {database} unreadable ({type(exc).__name__}): files verified alone, "
                      f"{unchecked}")
    if head is None:
        return None, f"no audit chain in {database}: files verified alone, {unchecked}"
    return head, f"checked up to the database's chain head, seq {head[0]}"


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Check the audit hash chain of files (default: AUDIT_LOG_FILE and rotated siblings) or, with --db, the table."""
    outcomes: dict[str, auditchain.VerifyResult] = {}
    notes: dict[str, str] = {}
    if args.files:
        paths = [Path(name) for name in args.files]
        for path in paths:
            if not path.is_file():
                raise UsageError(f"no audit file at {path}")
        outcomes["files"] = auditchain.verify_files(paths)
    elif not args.db:
        settings = _settings()
        if settings.audit_log_file is None:
            raise UsageError("AUDIT_LOG_FILE is empty: there are no audit files (use --db)")
        paths = auditchain.audit_files(settings.audit_log_file)
        if not paths:
            raise CommandError(f"no audit files at {settings.audit_log_file}")
        # Read before the files, so a gateway writing meanwhile only adds lines past it.
        head, head_note = _files_chain_head(settings)
        outcomes["files"] = auditchain.verify_files(paths, head=head, growing=True)
        notes["files"] = head_note
    if args.db:
        outcomes["db"] = asyncio.run(_verify_db(_settings()))
    if args.json:
        _print_json({name: {**_result_document(result), **({"note": notes[name]} if name in notes else {})}
                     for name, result in outcomes.items()})
    else:
        labels = {"files": "files", "db": auditchain.TABLE}
        for name, result in outcomes.items():
            print(f"{labels[name]}: {result.describe()}{f'; {notes[name]}' if name in notes else ''}")
    return EXIT_OK if all(result.ok for result in outcomes.values()) else EXIT_FAILED


# ---- running the gateway, and secrets ----

class _EncryptedKey(Exception):
    """TLS_KEY_FILE asked for a passphrase."""


def _refuse_passphrase() -> bytes:
    raise _EncryptedKey


def build_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """Return the server TLS context for TLS_CERT_FILE/TLS_KEY_FILE with TLS_MIN_VERSION, or None for plain HTTP."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_3 if settings.tls_min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    for variable, path in (("TLS_CERT_FILE", settings.tls_cert_file), ("TLS_KEY_FILE", settings.tls_key_file)):
        if not path.is_file():
            raise UsageError(f"configuration error: {variable}: no file at {path}")
    try:
        # Without a password callback OpenSSL would prompt on the terminal for an encrypted key,
        # and a service under a supervisor would hang there.
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file, password=_refuse_passphrase)
    except _EncryptedKey:
        raise UsageError(f"configuration error: TLS_KEY_FILE: {settings.tls_key_file} is encrypted with a "
                         f"passphrase, which is not supported; give an unencrypted key (readable only by "
                         f"the gateway's user)") from None
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"configuration error: TLS_CERT_FILE/TLS_KEY_FILE: cannot load the certificate and key "
                         f"({type(exc).__name__})") from None
    return context


def _with_frozen_gc(app: web.Application) -> web.Application:
    """Move what startup allocated out of the collector's sight: fewer and shorter GC passes per request."""
    async def freeze(app: web.Application) -> None:
        gc.collect()
        gc.freeze()
    app.on_startup.append(freeze)
    return app


def _startup_file_error(settings: Settings, failed: Path, reason: str) -> CommandError:
    """Return the one line for a file that could not be opened at startup, naming its variable."""
    failed = failed.absolute()
    paths = [(variable, path.absolute()) for variable, path in (
        ("DATABASE_PATH", settings.database_path), ("AUDIT_LOG_FILE", settings.audit_log_file),
        ("LOG_FILE", settings.log_file)) if path is not None]
    own = {variable: {path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")}
           for variable, path in paths}
    # The file itself first, then a directory on its way (created by mkdir -p); the database opens
    # first, so a directory shared by both paths is reported against it.
    for variable, path in paths:
        if failed in own[variable]:
            return UsageError(f"configuration error: {variable}: cannot use {path}: {reason}")
    for variable, path in paths:
        if failed in path.parents:
            return UsageError(f"configuration error: {variable}: cannot use {path} ({failed}: {reason})")
    return CommandError(f"cannot start: {failed}: {reason}")


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the gateway until SIGINT/SIGTERM."""
    settings = _settings()
    context = build_ssl_context(settings)
    try:
        listener = configure_logging(settings)
    except ConfigError as exc:
        raise _configuration_error(exc) from None
    try:
        try:
            import uvloop
        except ImportError:
            loop = None
        else:
            loop = uvloop.new_event_loop()
        scheme = "https" if context is not None else "http"

        def listening(_banner: str) -> None:
            # run_app calls this once every socket is bound and listening: never claim it before.
            log.info("llm-proxy %s listening on %s://%s:%d", __version__, scheme, settings.listen_host or "*",
                     settings.listen_port, extra={"event_loop": "uvloop" if loop is not None else "asyncio"})

        try:
            web.run_app(_with_frozen_gc(create_app(settings)), host=settings.listen_host or None,
                        port=settings.listen_port,
                        ssl_context=context, shutdown_timeout=settings.shutdown_grace, handler_cancellation=True,
                        access_log_class=AccessLogger, access_log=logging.getLogger(ACCESS_LOGGER),
                        print=listening, loop=loop, keepalive_timeout=CONNECTION_IDLE_TIMEOUT)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            if isinstance(exc, FileExistsError):  # mkdir -p met a file where a directory belongs
                reason = "Not a directory"
            if exc.filename is not None:  # a file opened at startup (audit log, database directory)
                raise _startup_file_error(settings, Path(os.fsdecode(exc.filename)), reason) from None
            raise CommandError(f"cannot listen on {settings.listen_host or '*'}:{settings.listen_port}: "
                               f"{reason}") from None
        except StorageError as exc:
            raise CommandError(f"DATABASE_PATH: cannot use {settings.database_path} ({exc})") from None
        except ConfigError as exc:  # found at startup, e.g. an ENCRYPTION_KEY that opens no stored key
            raise _configuration_error(exc) from None
        log.info("llm-proxy stopped")
    finally:
        listener.stop()
    return EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    """Write a .env with fresh MANAGEMENT_TOKEN and ENCRYPTION_KEY (mode 600), never overwriting one."""
    path = Path(args.path)
    management_token, encryption_key = generate_secret(), generate_encryption_key()
    content = (f"# Written by `llm-proxy init`. Keep this file secret (mode 600).\n"
               f"MANAGEMENT_TOKEN={management_token}\nENCRYPTION_KEY={encryption_key}\n")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CommandError(f"{path} exists already; not overwriting it") from None
    except OSError as exc:
        raise CommandError(f"cannot create {path} ({exc.strerror})") from None
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), 0o600)  # whatever the umask
        handle.write(content)
    # The README promises the management token once on screen; the encryption key stays in the file.
    print(f"wrote {path} (mode 600). Your management token, shown this once:\n\n  {management_token}\n")
    return EXIT_OK


def cmd_gen_secret(args: argparse.Namespace) -> int:
    """Print a fresh secret: a management token, or an encryption key with --encryption-key."""
    print(generate_encryption_key() if args.encryption_key else generate_secret())
    return EXIT_OK


# ---- the parser ----

class _Parser(argparse.ArgumentParser):
    """Print a usage error as one line that points to --help, and exit 2."""

    def error(self, message: str) -> Any:
        command = self.prog.removeprefix("llm-proxy").strip()
        where = f"{command}: " if command else ""
        self.exit(EXIT_USAGE, f"llm-proxy: {where}{message} (see `{self.prog} --help`)\n")


def _add(commands: Any, name: str, run: Callable[[argparse.Namespace], int], help_text: str,
         parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text, description=run.__doc__, parents=list(parents))
    parser.set_defaults(run=run)
    return parser


def _group(commands: Any, name: str, help_text: str) -> Any:
    parser = commands.add_parser(name, help=help_text, description=help_text)
    return parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True,
                                 parser_class=_Parser)


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


_positive, _non_negative = _whole_number(1), _whole_number(0)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every command."""
    remote = _Parser(add_help=False)
    options = remote.add_argument_group("gateway connection")
    options.add_argument("--url", help=f"gateway base URL (default: $LLM_PROXY_URL or {DEFAULT_URL})")
    options.add_argument("--token-file", metavar="FILE",
                         help="read the management token from FILE (default: $MANAGEMENT_TOKEN or .env)")
    options.add_argument("--cafile", metavar="FILE", help="trust this CA certificate for an https:// gateway")
    options.add_argument("--timeout", type=_seconds, default=30.0, metavar="SECONDS", help="default: 30")
    output = _Parser(add_help=False)
    output.add_argument("--json", action="store_true", help="print JSON instead of a table")

    parser = _Parser(prog="llm-proxy", description="OpenAI-compatible gateway with short-lived tokens.",
                     epilog="Run `llm-proxy COMMAND --help` for the options of a command.")
    parser.add_argument("--version", action="version", version=f"llm-proxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    _add(commands, "serve", cmd_serve, "run the gateway")
    init = _add(commands, "init", cmd_init, "write a .env with fresh secrets")
    init.add_argument("--path", default=".env", help="where to write (default: .env)")
    gen = _add(commands, "gen-secret", cmd_gen_secret, "print a fresh secret")
    gen.add_argument("--encryption-key", action="store_true", help="print an ENCRYPTION_KEY instead")

    api = (remote, output)
    projects = _group(commands, "project", "manage projects on a running gateway")
    create = _add(projects, "create", cmd_project_create, "create a project", api)
    create.add_argument("name")
    create.add_argument("--api-key-file", metavar="FILE",
                        help="read the upstream API key from FILE (`-` = stdin; default: prompt, or stdin if piped)")
    listing = _add(projects, "list", cmd_project_list, "list projects", api)
    state = listing.add_mutually_exclusive_group()
    state.add_argument("--active", dest="active", action="store_const", const=True, help="only active projects")
    state.add_argument("--inactive", dest="active", action="store_const", const=False, help="only inactive ones")
    _add(projects, "get", cmd_project_get, "show a project", api).add_argument("id")
    update = _add(projects, "update", cmd_project_update, "change a project", api)
    update.add_argument("id")
    update.add_argument("--name")
    update.add_argument("--api-key-file", metavar="FILE", help="replace the upstream key with FILE's (`-` = stdin)")
    state = update.add_mutually_exclusive_group()
    state.add_argument("--activate", dest="active", action="store_const", const=True)
    state.add_argument("--deactivate", dest="active", action="store_const", const=False)

    tokens = _group(commands, "token", "manage client tokens on a running gateway")
    create = _add(tokens, "create", cmd_token_create, "issue a token", api)
    create.add_argument("project_id")
    create.add_argument("--duration", dest="duration_minutes", type=_positive, metavar="MINUTES",
                        help="lifetime (default: DEFAULT_TOKEN_DURATION_MINUTES of the gateway)")
    create.add_argument("--max-requests", type=_non_negative, metavar="N", help="lifetime request quota")
    create.add_argument("--rate-limit", dest="rate_limit_per_minute", type=_non_negative, metavar="N",
                        help="requests per minute (0 = unlimited; default: the gateway's)")
    create.add_argument("--max-tokens-total", type=_non_negative, metavar="N", help="usage budget in model tokens")
    listing = _add(tokens, "list", cmd_token_list, "list tokens", api)
    listing.add_argument("--project", metavar="PROJECT_ID", help="only this project's tokens")
    listing.add_argument("--active-only", action="store_true", help="leave out revoked, inactive and expired ones")
    _add(tokens, "get", cmd_token_get, "show a token", api).add_argument("id")
    revoke = _add(tokens, "revoke", cmd_token_revoke, "revoke a token (or all of a project's)", api)
    revoke.add_argument("id", nargs="?")
    revoke.add_argument("--project", metavar="PROJECT_ID", help="revoke every token of this project")
    refresh = _add(tokens, "refresh", cmd_token_refresh, "replace a token with a new one", api)
    refresh.add_argument("id")
    refresh.add_argument("--duration", dest="duration_minutes", type=_positive, metavar="MINUTES")
    refresh.add_argument("--grace-seconds", type=_non_negative, metavar="N",
                         help="keep the old token working this long (default: 0)")

    audit = _group(commands, "audit", "check and prune the audit trail (on the gateway's host)")
    prune = _add(audit, "prune", cmd_audit_prune, "delete old audit rows", (output,))
    prune.add_argument("--older-than-days", type=_non_negative, metavar="N",
                       help="default: AUDIT_RETENTION_DAYS")
    prune.add_argument("--batch-size", type=_positive, default=1000, metavar="N", help="rows per transaction")
    verify = _add(audit, "verify", cmd_audit_verify, "verify the audit hash chain", (output,))
    verify.add_argument("files", nargs="*", metavar="FILE", help="audit files, rotated ones included (.gz too)")
    verify.add_argument("--db", action="store_true", help="verify the audit_events table")

    _add(commands, "rotate-key", cmd_rotate_key, "re-encrypt stored API keys under ENCRYPTION_KEY", (output,))
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


if __name__ == "__main__":
    sys.exit(main())

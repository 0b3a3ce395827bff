"""`llm-proxy serve`: run the gateway until SIGINT/SIGTERM, a startup failure shown as one line."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import socket
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web

from llm_proxy import __version__
from llm_proxy.app import CONNECTION_IDLE_TIMEOUT, create_app
from llm_proxy.ops.access_log import ACCESS_LOGGER, AccessLogger
from llm_proxy.ops.cli.arguments import add_command, positive
from llm_proxy.ops.cli.configuration import command_settings, configuration_error
from llm_proxy.ops.command_errors import EXIT_OK, CommandError, UsageError
from llm_proxy.ops.logs import configure_logging
from llm_proxy.ops.tls import build_ssl_context
from llm_proxy.ops.workers import Supervisor, is_worker, report_ready
from llm_proxy.settings import ConfigError, Settings
from llm_proxy.storage.errors import DatabaseOwned, StorageError
from llm_proxy.storage.factory import database_variable, describe_database, is_postgres

log = logging.getLogger("llm_proxy")


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
    database = None if is_postgres(settings) else settings.database_path
    paths = [(variable, path.absolute()) for variable, path in (
        ("DATABASE_PATH", database), ("AUDIT_LOG_FILE", settings.audit_log_file),
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
    """Run the gateway until SIGINT/SIGTERM (with --workers N: N worker processes on one port)."""
    settings = command_settings()
    workers = settings.workers if args.workers is None else args.workers
    if workers > 1 and not settings.redis_url:
        raise UsageError("--workers/WORKERS: more than 1 worker needs REDIS_URL (the workers share their limits "
                         "and token changes through it)")
    settings = replace(settings, workers=workers, instance_id=settings.instance_id or socket.gethostname())
    if workers > 1:
        return _supervise(settings)
    context = build_ssl_context(settings)
    try:
        listener = configure_logging(settings)
    except ConfigError as exc:
        raise configuration_error(exc) from None
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
                     settings.listen_port, extra={"event_loop": "uvloop" if loop is not None else "asyncio",
                                                  "instance": settings.instance_id})
            report_ready()  # to the parent, when this is one of several workers

        try:
            web.run_app(_with_frozen_gc(create_app(settings)), host=settings.listen_host or None,
                        port=settings.listen_port,
                        ssl_context=context, shutdown_timeout=settings.shutdown_grace, handler_cancellation=True,
                        access_log_class=AccessLogger, access_log=logging.getLogger(ACCESS_LOGGER),
                        print=listening, loop=loop, keepalive_timeout=CONNECTION_IDLE_TIMEOUT,
                        reuse_port=True if is_worker() else None)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            if isinstance(exc, FileExistsError):  # mkdir -p met a file where a directory belongs
                reason = "Not a directory"
            if exc.filename is not None:  # a file opened at startup (audit log, database directory)
                raise _startup_file_error(settings, Path(os.fsdecode(exc.filename)), reason) from None
            raise CommandError(f"cannot listen on {settings.listen_host or '*'}:{settings.listen_port}: "
                               f"{reason}") from None
        except DatabaseOwned as exc:
            where = f"{database_variable(settings)} {describe_database(settings)}"
            if exc.shared:
                raise CommandError(f"cannot start: {where} is served by {exc.holder}; set the same REDIS_URL to "
                                   "serve beside them") from None
            fix = ("stop that process first, or give it the same REDIS_URL" if settings.redis_url
                   else "stop that process first (one serving process per database)")
            raise CommandError(f"cannot start: {where} is already served by {exc.holder}; {fix}") from None
        except StorageError as exc:
            raise CommandError(f"{database_variable(settings)}: cannot use {describe_database(settings)} "
                               f"({exc})") from None
        except ConfigError as exc:  # found at startup, e.g. an ENCRYPTION_KEY that opens no stored key
            raise configuration_error(exc) from None
        log.info("llm-proxy stopped")
    finally:
        listener.stop()
    return EXIT_OK


def _supervise(settings: Settings) -> int:
    """Run `settings.workers` children, each a `serve` of one worker named INSTANCE_ID-N, until SIGTERM/SIGINT."""
    try:
        listener = configure_logging(settings)
    except ConfigError as exc:
        raise configuration_error(exc) from None

    def command(number: int) -> list[str]:
        return [sys.executable, "-m", "llm_proxy", "serve", "--workers", "1"]

    def environment(number: int) -> dict[str, str]:
        return {**os.environ, "WORKERS": "1", "INSTANCE_ID": f"{settings.instance_id}-{number}"}

    try:
        log.info("llm-proxy %s starting %d workers on %s:%d", __version__, settings.workers,
                 settings.listen_host or "*", settings.listen_port)
        supervisor = Supervisor(settings.workers, command, environment, grace=settings.shutdown_grace)
        code = asyncio.run(supervisor.run())
        log.info("llm-proxy stopped (%d workers)", settings.workers)
        return code
    finally:
        listener.stop()


def add_commands(commands: Any) -> None:
    """Add `serve`."""
    parser = add_command(commands, "serve", cmd_serve, "run the gateway")
    parser.add_argument("--workers", type=positive, metavar="N",
                        help="processes serving one port (default: WORKERS, 1); more than 1 needs REDIS_URL")

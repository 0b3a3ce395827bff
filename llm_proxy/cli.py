"""The `llm-proxy` command: serve the gateway, create secrets, and operate a running gateway."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

from .credentials import generate_encryption_key, generate_secret
from .settings import ConfigError, Settings, load_settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CommandError(Exception):
    """A command failed; str() is the one line shown to the operator."""


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"llm-proxy: {message}", file=sys.stderr)
    return code


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        raise CommandError(f"configuration error: {exc}") from None


def _ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_3 if settings.tls_min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise CommandError(f"TLS_CERT_FILE/TLS_KEY_FILE: cannot load the certificate ({type(exc).__name__})") from None
    return context


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the gateway until SIGINT/SIGTERM."""
    from aiohttp import web

    from .app import create_app

    settings = _settings()
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
    except ImportError:
        pass
    else:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    context = _ssl_context(settings)
    web.run_app(create_app(settings), host=settings.listen_host or None, port=settings.listen_port,
                ssl_context=context, shutdown_timeout=settings.shutdown_grace, handler_cancellation=True,
                access_log=None, print=lambda line: print(line, file=sys.stderr))
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
    with os.fdopen(fd, "w") as handle:
        handle.write(content)
    print(f"wrote {path} (mode 600). Your management token, shown this once:\n\n  {management_token}\n")
    return EXIT_OK


def cmd_gen_secret(args: argparse.Namespace) -> int:
    """Print a fresh secret: a management token, or an encryption key with --encryption-key."""
    print(generate_encryption_key() if args.encryption_key else generate_secret())
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every command."""
    parser = argparse.ArgumentParser(prog="llm-proxy", description="OpenAI-compatible gateway with short-lived tokens.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser("serve", help="run the gateway", description=cmd_serve.__doc__)
    serve.set_defaults(run=cmd_serve)

    init = commands.add_parser("init", help="write a .env with fresh secrets", description=cmd_init.__doc__)
    init.add_argument("--path", default=".env", help="where to write (default: .env)")
    init.set_defaults(run=cmd_init)

    gen = commands.add_parser("gen-secret", help="print a fresh secret", description=cmd_gen_secret.__doc__)
    gen.add_argument("--encryption-key", action="store_true", help="print an ENCRYPTION_KEY instead")
    gen.set_defaults(run=cmd_gen_secret)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `llm-proxy` console script."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        return int(args.run(args))
    except CommandError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

"""Talk to a running gateway's /manage API: its URL, the management token, the CA, and one-line failures."""

from __future__ import annotations

import argparse
import re
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from llm_proxy import __version__
from llm_proxy.audit.masking import mask_secrets
from llm_proxy.ops.cli.arguments import CommandParser
from llm_proxy.ops.command_errors import CommandError, UsageError
from llm_proxy.settings import read_client_variable

DEFAULT_URL = "http://127.0.0.1:8080"


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


def connection_options() -> argparse.ArgumentParser:
    """Return the parent parser of --url, --token-file, --cafile and --timeout."""
    remote = CommandParser(add_help=False)
    options = remote.add_argument_group("gateway connection")
    options.add_argument("--url", help=f"gateway base URL (default: $LLM_PROXY_URL or {DEFAULT_URL})")
    options.add_argument("--token-file", metavar="FILE",
                         help="read the management token from FILE (default: $MANAGEMENT_TOKEN or .env)")
    options.add_argument("--cafile", metavar="FILE", help="trust this CA certificate for an https:// gateway")
    options.add_argument("--timeout", type=_seconds, default=30.0, metavar="SECONDS", help="default: 30")
    return remote


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


async def call(args: argparse.Namespace, method: str, path: str, *, body: dict[str, Any] | None = None,
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

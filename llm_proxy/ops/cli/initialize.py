"""`llm-proxy init` and `llm-proxy gen-secret`: create the gateway's secrets."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from llm_proxy.ops.cli.arguments import add_command
from llm_proxy.ops.command_errors import EXIT_OK, CommandError
from llm_proxy.tokens.credentials import generate_encryption_key, generate_secret


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


def add_commands(commands: Any) -> None:
    """Add `init` and `gen-secret`."""
    init = add_command(commands, "init", cmd_init, "write a .env with fresh secrets")
    init.add_argument("--path", default=".env", help="where to write (default: .env)")
    gen = add_command(commands, "gen-secret", cmd_gen_secret, "print a fresh secret")
    gen.add_argument("--encryption-key", action="store_true", help="print an ENCRYPTION_KEY instead")

"""`llm-proxy rotate-key`: re-encrypt the stored upstream keys under the current ENCRYPTION_KEY."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from llm_proxy.audit.writer import AuditWriter
from llm_proxy.crypto import DecryptionError, KeyRing
from llm_proxy.ops.cli.arguments import add_command, json_option
from llm_proxy.ops.cli.configuration import command_settings
from llm_proxy.ops.cli.local_database import with_database
from llm_proxy.ops.cli.output import print_json
from llm_proxy.ops.command_errors import EXIT_OK, CommandError
from llm_proxy.storage.base import Store


def cmd_rotate_key(args: argparse.Namespace) -> int:
    """Re-encrypt every stored upstream key under ENCRYPTION_KEY, reading old ones with ENCRYPTION_KEY_PREVIOUS."""
    settings = command_settings()
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

    count = asyncio.run(with_database(settings, work))
    if args.json:
        print_json({"reencrypted": count})
    else:
        print(f"re-encrypted {count} project key(s) under the current ENCRYPTION_KEY")
    return EXIT_OK


def add_commands(commands: Any) -> None:
    """Add `rotate-key`."""
    add_command(commands, "rotate-key", cmd_rotate_key, "re-encrypt stored API keys under ENCRYPTION_KEY",
                (json_option(),))

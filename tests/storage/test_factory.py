"""The factory picks the backend from DATABASE_URL; SQLite needs nothing else installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llm_proxy.settings import ConfigError, load_settings
from llm_proxy.storage.factory import describe_database, open_store
from llm_proxy.storage.sqlite.store import SqliteStore
from tests.fakes import ENCRYPTION_KEY, MANAGEMENT_TOKEN, REPO

BASE = {"MANAGEMENT_TOKEN": MANAGEMENT_TOKEN, "ENCRYPTION_KEY": ENCRYPTION_KEY}
URL = "postgresql://llm:Secret-42@db.internal:5432/gateway"


def test_sqlite_is_the_default_and_a_sqlite_url_names_its_file(tmp_path: Path) -> None:
    default = load_settings(BASE, env_file=None)
    store = open_store(default)
    assert isinstance(store, SqliteStore) and store.path == Path("./data/llm-proxy.db")
    assert describe_database(default) == "data/llm-proxy.db"
    named = load_settings({**BASE, "DATABASE_URL": f"sqlite:///{tmp_path}/x.db"}, env_file=None)
    store = open_store(named)
    assert isinstance(store, SqliteStore) and store.path == tmp_path / "x.db"


def test_a_postgresql_url_gives_the_postgresql_store_shown_without_its_password() -> None:
    pytest.importorskip("asyncpg")
    from llm_proxy.storage.postgres.store import PostgresStore
    settings = load_settings({**BASE, "DATABASE_URL": URL}, env_file=None)
    assert isinstance(open_store(settings), PostgresStore)
    assert describe_database(settings) == "postgresql://llm:***@db.internal:5432/gateway"


def test_without_asyncpg_a_postgresql_url_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SQLite install has no asyncpg: DATABASE_URL=postgresql://… then says what to install."""
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # `import asyncpg` raises ImportError
    for name in [name for name in sys.modules if name.startswith("llm_proxy.storage.postgres")]:
        monkeypatch.delitem(sys.modules, name)
    settings = load_settings({**BASE, "DATABASE_URL": URL}, env_file=None)
    with pytest.raises(ConfigError, match=r"^DATABASE_URL: PostgreSQL needs the asyncpg package: pip install "
                                          r"'llm-proxy\[postgres\]'$") as raised:
        open_store(settings)
    assert "Secret-42" not in str(raised.value)


@pytest.mark.system
def test_the_gateway_and_the_cli_import_no_postgresql_driver_on_sqlite() -> None:
    """The `postgres` extra is optional: nothing a SQLite gateway loads imports asyncpg."""
    code = ("import sys; import llm_proxy.app, llm_proxy.ops.cli, llm_proxy.storage.factory; "
            "print(sorted(name for name in sys.modules if name.startswith(('asyncpg', 'llm_proxy.storage.postgres'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                            check=True)
    assert result.stdout.strip() == "[]"

"""Configuration: every documented variable is read, bad values stop startup with one clear line."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llm_proxy.settings import (
    VARIABLES,
    ConfigError,
    Settings,
    database_url_passwords,
    load_settings,
    redact_database_url,
)
from tests.fakes import ENCRYPTION_KEY, MANAGEMENT_TOKEN, REPO

README = REPO / "README.md"
BASE = {"MANAGEMENT_TOKEN": MANAGEMENT_TOKEN, "ENCRYPTION_KEY": ENCRYPTION_KEY}


def test_readme_configuration_table_matches_the_variables_read() -> None:
    documented = set(re.findall(r"^\| `([A-Z_]+)`", README.read_text(), flags=re.MULTILINE))
    assert documented == set(VARIABLES)


def test_every_variable_maps_to_a_settings_field() -> None:
    fields = {field.name for field in dataclasses.fields(Settings)}
    # LISTEN_ADDR is split into host and port; ENCRYPTION_KEY_PREVIOUS is a tuple of keys.
    renamed = {"LISTEN_ADDR": "listen_host", "MANAGEMENT_TOKEN": "management_tokens",
               "ENCRYPTION_KEY_PREVIOUS": "encryption_keys_previous"}
    for variable in VARIABLES:
        assert renamed.get(variable, variable.lower()) in fields, variable


def test_defaults() -> None:
    settings = load_settings(BASE, env_file=None)
    assert (settings.listen_host, settings.listen_port) == ("", 8080)
    assert settings.max_request_size == 10 * 1024 * 1024
    assert settings.request_timeout == 60 and settings.stream_idle_timeout == 300
    assert settings.audit_log_file == Path("./data/audit.log")
    assert settings.allowed_endpoints[0] == "/v1/chat/completions"


def test_values_are_parsed() -> None:
    settings = load_settings({**BASE, "LISTEN_ADDR": "127.0.0.1:9000", "MAX_REQUEST_SIZE": "512KB",
                              "REQUEST_TIMEOUT": "500ms", "STREAM_IDLE_TIMEOUT": "2m", "AUDIT_LOG_FILE": "",
                              "TRUSTED_PROXIES": "10.0.0.0/8, ::1", "ALLOWED_MODELS": "gpt-4o*, o1",
                              "MANAGEMENT_TOKEN": f"{MANAGEMENT_TOKEN},{'z' * 32}", "AUDIT_ENABLED": "false"},
                             env_file=None)
    assert (settings.listen_host, settings.listen_port) == ("127.0.0.1", 9000)
    assert settings.max_request_size == 512 * 1024
    assert settings.request_timeout == 0.5 and settings.stream_idle_timeout == 120
    assert settings.audit_log_file is None and settings.audit_enabled is False
    assert [str(n) for n in settings.trusted_proxies] == ["10.0.0.0/8", "::1/128"]
    assert settings.allowed_models == ("gpt-4o*", "o1")
    assert len(settings.management_tokens) == 2


def test_dotenv_file_is_read_and_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(f"MANAGEMENT_TOKEN={MANAGEMENT_TOKEN}\nENCRYPTION_KEY={ENCRYPTION_KEY}\nLOG_LEVEL=debug\n")
    settings = load_settings({"LOG_LEVEL": "error"}, env_file=env_file)
    assert settings.log_level == "error"
    assert settings.management_tokens == (MANAGEMENT_TOKEN,)


@pytest.mark.parametrize(("overrides", "variable"), [
    ({"MANAGEMENT_TOKEN": ""}, "MANAGEMENT_TOKEN"),
    ({"MANAGEMENT_TOKEN": "short-secret-value"}, "MANAGEMENT_TOKEN"),
    ({"ENCRYPTION_KEY": ""}, "ENCRYPTION_KEY"),
    ({"ENCRYPTION_KEY": "not base64 !!"}, "ENCRYPTION_KEY"),
    ({"ENCRYPTION_KEY": "c2hvcnQ="}, "ENCRYPTION_KEY"),
    ({"ENCRYPTION_KEY_PREVIOUS": "c2hvcnQ="}, "ENCRYPTION_KEY_PREVIOUS"),
    ({"LISTEN_ADDR": "8080"}, "LISTEN_ADDR"),
    ({"LISTEN_ADDR": ":99999"}, "LISTEN_ADDR"),
    ({"OPENAI_API_URL": "ftp://x"}, "OPENAI_API_URL"),
    ({"OPENAI_API_URL": "https://api.openai.com/v1"}, "OPENAI_API_URL"),
    ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
    ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
    ({"AUDIT_ENABLED": "maybe"}, "AUDIT_ENABLED"),
    ({"RATE_LIMIT_PER_MINUTE": "-1"}, "RATE_LIMIT_PER_MINUTE"),
    ({"RATE_LIMIT_PER_MINUTE": "ten"}, "RATE_LIMIT_PER_MINUTE"),
    ({"MAX_REQUEST_SIZE": "big"}, "MAX_REQUEST_SIZE"),
    ({"REQUEST_TIMEOUT": "0s"}, "REQUEST_TIMEOUT"),
    ({"REQUEST_TIMEOUT": "soon"}, "REQUEST_TIMEOUT"),
    ({"REQUEST_TIMEOUT": "9" * 400}, "REQUEST_TIMEOUT"),  # a float that overflows to infinity
    ({"STREAM_IDLE_TIMEOUT": "8761h"}, "STREAM_IDLE_TIMEOUT"),
    ({"SHUTDOWN_GRACE": "1" * 320 + "s"}, "SHUTDOWN_GRACE"),
    ({"MANAGEMENT_ALLOWED_IPS": ","}, "MANAGEMENT_ALLOWED_IPS"),  # not "any": a typo of a restriction
    ({"MANAGEMENT_ALLOWED_IPS": "10.0.0.1/8"}, "MANAGEMENT_ALLOWED_IPS"),  # host bits: all of 10/8, or one host?
    ({"TRUSTED_PROXIES": "192.168.1.7/16"}, "TRUSTED_PROXIES"),
    ({"ALLOWED_MODELS": " , "}, "ALLOWED_MODELS"),
    ({"ALLOWED_ENDPOINTS": ",,"}, "ALLOWED_ENDPOINTS"),
    ({"TRUSTED_PROXIES": ","}, "TRUSTED_PROXIES"),
    ({"CORS_ALLOWED_ORIGINS": ","}, "CORS_ALLOWED_ORIGINS"),
    ({"TRUSTED_PROXIES": "10.0.0.0/33"}, "TRUSTED_PROXIES"),
    ({"MANAGEMENT_ALLOWED_IPS": "localhost"}, "MANAGEMENT_ALLOWED_IPS"),
    ({"CORS_ALLOWED_ORIGINS": "app.example.com"}, "CORS_ALLOWED_ORIGINS"),
    ({"ALLOWED_ENDPOINTS": "/admin"}, "ALLOWED_ENDPOINTS"),
    ({"TLS_MIN_VERSION": "1.1"}, "TLS_MIN_VERSION"),
    ({"TLS_CERT_FILE": "/tmp/cert.pem"}, "TLS_KEY_FILE"),
    ({"MAX_CONCURRENT_REQUESTS": "0"}, "MAX_CONCURRENT_REQUESTS"),
    ({"ANOMALY_RATE_FACTOR": "nan"}, "ANOMALY_RATE_FACTOR"),
    ({"DEFAULT_TOKEN_DURATION_MINUTES": "100", "MAX_TOKEN_DURATION_MINUTES": "10"}, "DEFAULT_TOKEN_DURATION_MINUTES"),
])
def test_invalid_values_name_the_variable(overrides: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE, **overrides}, env_file=None)
    assert caught.value.variable == variable
    assert str(caught.value).startswith(f"{variable}: ")
    for name, value in overrides.items():
        if name in ("MANAGEMENT_TOKEN", "ENCRYPTION_KEY", "ENCRYPTION_KEY_PREVIOUS") and value:
            assert value not in str(caught.value)  # secrets are never echoed


def test_every_invalid_variable_is_reported_at_once() -> None:
    """Review: with three invalid variables only the first was named, so the operator restarted three times."""
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE, "REQUEST_TIMEOUT": "soon", "MANAGEMENT_TOKEN": "short-secret-value",
                       "LISTEN_ADDR": "127.0.0.1:0", "TLS_KEY_FILE": "/tmp/key.pem",
                       "DEFAULT_TOKEN_DURATION_MINUTES": "100", "MAX_TOKEN_DURATION_MINUTES": "10"}, env_file=None)

    # In the README table's order, the checks across variables included.
    assert [variable for variable, _ in caught.value.problems] == [
        "MANAGEMENT_TOKEN", "LISTEN_ADDR", "DEFAULT_TOKEN_DURATION_MINUTES", "REQUEST_TIMEOUT", "TLS_CERT_FILE"]
    assert caught.value.variable == "MANAGEMENT_TOKEN"
    assert str(caught.value).splitlines() == [f"{variable}: {problem}" for variable, problem in caught.value.problems]
    assert "short-secret-value" not in str(caught.value)


def test_a_check_across_variables_is_left_out_when_one_of_them_is_invalid() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE, "DEFAULT_TOKEN_DURATION_MINUTES": "100", "MAX_TOKEN_DURATION_MINUTES": "ten"},
                      env_file=None)
    assert caught.value.problems == (("MAX_TOKEN_DURATION_MINUTES", "must be a whole number"),)


@pytest.mark.parametrize(("listen", "problem"), [
    ("127.0.0.1:0", "port 0 is not allowed"),
    (":65536", "port 65536 is out of range: the port must be 1-65535"),
    ("127.0.0.1", "must be host:port"),
    (":²", "must be host:port"),  # a digit to str.isdigit(), not to int()
])
def test_listen_addr_says_what_is_wrong_with_the_port(listen: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=f"^LISTEN_ADDR: {problem}"):
        load_settings({**BASE, "LISTEN_ADDR": listen}, env_file=None)


def test_settings_repr_hides_secrets() -> None:
    text = repr(load_settings(BASE, env_file=None))
    assert MANAGEMENT_TOKEN not in text and "encryption_key" not in text


# ---- DATABASE_URL ----


@pytest.mark.parametrize(("given", "path", "url"), [
    ("", Path("./data/llm-proxy.db"), ""),
    ("   ", Path("./data/llm-proxy.db"), ""),
    ("sqlite:///data/other.db", Path("data/other.db"), ""),  # relative, as SQLAlchemy reads it
    ("sqlite:////srv/llm/gateway.db", Path("/srv/llm/gateway.db"), ""),
    ("SQLITE:///x.db", Path("x.db"), ""),
    ("postgresql://llm:pw@db.internal:5432/gateway", Path("./data/llm-proxy.db"),
     "postgresql://llm:pw@db.internal:5432/gateway"),
    ("postgres://llm@db/gateway?sslmode=require", Path("./data/llm-proxy.db"),
     "postgres://llm@db/gateway?sslmode=require"),
    (" postgresql:///gateway?host=/run/postgresql ", Path("./data/llm-proxy.db"),
     "postgresql:///gateway?host=/run/postgresql"),
])
def test_database_url_names_sqlite_or_postgresql(given: str, path: Path, url: str) -> None:
    settings = load_settings({**BASE, "DATABASE_URL": given}, env_file=None)
    assert (settings.database_path, settings.database_url) == (path, url)


def test_a_sqlite_database_url_wins_over_database_path() -> None:
    settings = load_settings({**BASE, "DATABASE_PATH": "/a.db", "DATABASE_URL": "sqlite:////b.db"}, env_file=None)
    assert (settings.database_path, settings.database_url) == (Path("/b.db"), "")


@pytest.mark.parametrize(("given", "problem"), [
    ("mysql://root:Secret-42@db/gateway", "the scheme mysql:// is not supported"),
    ("root:Secret-42@db:5432/gateway", "must be empty (SQLite at DATABASE_PATH), sqlite:///PATH or postgresql://"),
    ("db.internal/gateway?password=Secret-42", "must be empty (SQLite at DATABASE_PATH)"),
    ("postgresql://root:Secret-42@db:54x2/gateway", "has a port that is not a number"),
    ("postgresql://root:Secret-42@db:99999/gateway", "has a port that is not a number"),
    ("postgresql://root:Secret-42@db/gate way", "must not contain spaces or control characters"),
    ("sqlite://Secret-42/x.db", "a sqlite URL has no host"),
    ("sqlite:///", "sqlite:/// needs the database file's path"),
])
def test_a_bad_database_url_is_named_without_its_password(given: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE, "DATABASE_URL": given}, env_file=None)
    assert caught.value.variable == "DATABASE_URL"
    assert str(caught.value).startswith(f"DATABASE_URL: {problem}")
    assert "Secret-42" not in str(caught.value)


def test_settings_repr_hides_the_database_url() -> None:
    settings = load_settings({**BASE, "DATABASE_URL": "postgresql://llm:Secret-42@db/gateway"}, env_file=None)
    assert "Secret-42" not in repr(settings)


@pytest.mark.parametrize(("url", "shown", "passwords"), [
    ("postgresql://llm:Secret-42@db:5432/gw", "postgresql://llm:***@db:5432/gw", ("Secret-42",)),
    ("postgresql://llm:p%40ss@db/gw", "postgresql://llm:***@db/gw", ("p%40ss", "p@ss")),
    ("postgresql://llm:a:b@db/gw", "postgresql://llm:***@db/gw", ("a:b", "a%3Ab")),
    ("postgresql://db/gw?user=llm&password=Secret-42&sslmode=require",
     "postgresql://db/gw?user=llm&password=***&sslmode=require", ("Secret-42",)),
    ("postgresql://llm@db/gw", "postgresql://llm@db/gw", ()),
])
def test_a_database_url_is_shown_without_its_passwords(url: str, shown: str, passwords: tuple[str, ...]) -> None:
    assert redact_database_url(url) == shown
    assert sorted(database_url_passwords(url)) == sorted(passwords)


# ---- REDIS_URL, REDIS_FAILURE_MODE, WORKERS, INSTANCE_ID ----


def test_several_processes_are_off_by_default() -> None:
    settings = load_settings(BASE, env_file=None)
    assert (settings.redis_url, settings.redis_failure_mode, settings.workers, settings.instance_id) == \
        ("", "closed", 1, "")


def test_redis_url_failure_mode_workers_and_instance_are_read() -> None:
    settings = load_settings({**BASE, "REDIS_URL": " rediss://:Secret-42@cache:6380/2 ", "REDIS_FAILURE_MODE": "OPEN",
                              "WORKERS": "3", "INSTANCE_ID": "gw-a.eu-1"}, env_file=None)
    assert (settings.redis_url, settings.redis_failure_mode, settings.workers, settings.instance_id) == \
        ("rediss://:Secret-42@cache:6380/2", "open", 3, "gw-a.eu-1")
    assert "Secret-42" not in repr(settings)


@pytest.mark.parametrize(("variables", "problem"), [
    ({"REDIS_URL": "http://:Secret-42@cache:6379"}, "REDIS_URL: must be redis://"),
    ({"REDIS_URL": "redis://:Secret-42@cache:63x9"}, "REDIS_URL: has a port that is not a number"),
    ({"REDIS_URL": "redis://:Secret 42@cache"}, "REDIS_URL: must not contain spaces"),
    ({"REDIS_FAILURE_MODE": "maybe"}, "REDIS_FAILURE_MODE: must be one of closed, open"),
    ({"WORKERS": "0"}, "WORKERS: must be"),
    ({"WORKERS": "2"}, "WORKERS: more than 1 worker needs REDIS_URL"),
    ({"INSTANCE_ID": "gw a"}, "INSTANCE_ID: must be 1 to 64 letters"),
    ({"INSTANCE_ID": "-gw"}, "INSTANCE_ID: must be 1 to 64 letters"),
])
def test_bad_scale_out_settings_are_named(variables: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE, **variables}, env_file=None)
    assert str(caught.value).startswith(problem)
    assert "Secret-42" not in str(caught.value)


def test_workers_with_redis_are_accepted() -> None:
    assert load_settings({**BASE, "WORKERS": "2", "REDIS_URL": "redis://127.0.0.1:6379/0"}, env_file=None).workers == 2


@pytest.mark.system
def test_serve_with_bad_config_prints_one_line_and_exits_nonzero(tmp_path: Path) -> None:
    secret = "too-short-but-secret"
    result = subprocess.run([sys.executable, "-m", "llm_proxy", "serve"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env={"MANAGEMENT_TOKEN": secret, "ENCRYPTION_KEY": ENCRYPTION_KEY,
                                                        "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "MANAGEMENT_TOKEN" in lines[0]
    assert "Traceback" not in result.stderr and secret not in result.stderr


@pytest.mark.system
def test_serve_names_every_invalid_variable_on_its_own_line(tmp_path: Path) -> None:
    secret = "too-short-but-secret"
    result = subprocess.run([sys.executable, "-m", "llm_proxy", "serve"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env={"MANAGEMENT_TOKEN": secret, "ENCRYPTION_KEY": ENCRYPTION_KEY,
                                                        "LISTEN_ADDR": "127.0.0.1:0", "LOG_LEVEL": "loud",
                                                        "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "llm-proxy: configuration error: MANAGEMENT_TOKEN: token #1 is shorter than 32 characters",
        "llm-proxy: configuration error: LISTEN_ADDR: port 0 is not allowed: give a port from 1 to 65535",
        "llm-proxy: configuration error: LOG_LEVEL: must be one of debug, info, warning, error"]
    assert "Traceback" not in result.stderr and secret not in result.stderr and result.stdout == ""

"""Build the one frozen Settings object from the environment and `.env` (the only reader of os.environ)."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qsl, quote, unquote, unquote_plus, urlsplit, urlunsplit

from dotenv import dotenv_values

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")

DEFAULT_ALLOWED_ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/models",
    "/v1/moderations",
    "/v1/images",
    "/v1/audio",
    "/v1/responses",
)
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """One or more configuration variables are missing or invalid.

    `problems` holds each (variable, problem) pair, `variable` names the first; str() is one
    `VARIABLE: problem` line per pair, what the operator is shown.
    """

    def __init__(self, variable: str, problem: str, *more: tuple[str, str]) -> None:
        self.problems = ((variable, problem), *more)
        super().__init__("\n".join(f"{name}: {text}" for name, text in self.problems))
        self.variable = variable


@dataclass(frozen=True, slots=True)
class Settings:
    management_tokens: tuple[str, ...] = field(repr=False)
    encryption_key: bytes = field(repr=False)
    encryption_keys_previous: tuple[bytes, ...] = field(default=(), repr=False)
    management_allowed_ips: tuple[IPNetwork, ...] = ()
    openai_api_url: str = "https://api.openai.com"
    listen_host: str = ""
    listen_port: int = 8080
    database_path: Path = Path("./data/llm-proxy.db")
    database_url: str = field(default="", repr=False)  # a PostgreSQL URL; empty = SQLite at database_path
    log_level: str = "info"
    log_format: str = "json"
    log_file: Path | None = None
    audit_enabled: bool = True
    audit_log_file: Path | None = Path("./data/audit.log")
    audit_create_dir: bool = True
    audit_store_in_db: bool = True
    audit_mask_client_ip: bool = False
    audit_retention_days: int = 90
    trusted_proxies: tuple[IPNetwork, ...] = ()
    cors_allowed_origins: tuple[str, ...] = ()
    allowed_endpoints: tuple[str, ...] = DEFAULT_ALLOWED_ENDPOINTS
    allowed_models: tuple[str, ...] = ()
    default_token_duration_minutes: int = 60
    max_token_duration_minutes: int = 43200
    rate_limit_per_minute: int = 600
    ip_rate_limit: int = 60
    global_rate_limit: int = 0
    max_request_size: int = 10 * 1024 * 1024
    request_timeout: float = 60.0
    stream_idle_timeout: float = 300.0
    max_concurrent_requests: int = 1000
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_min_version: str = "1.2"
    hsts_max_age: int = 31536000
    shutdown_grace: float = 30.0
    anomaly_max_ips_per_hour: int = 10
    anomaly_rate_factor: float = 10.0
    anomaly_auto_suspend: bool = False
    redis_url: str = field(default="", repr=False)  # empty: this process alone owns its database
    redis_failure_mode: str = "closed"
    workers: int = 1
    instance_id: str = ""  # empty: the host name (and the worker's number under --workers)
    admin_console: bool = True

    @property
    def instance(self) -> str:
        """The name of this process in audit events (its chain), logs and metrics: INSTANCE_ID or the host name."""
        return self.instance_id or socket.gethostname()


# ---- value parsers: each raises ValueError with a message that never repeats a secret ----

def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _int_parser(minimum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError("must be a whole number") from None
        if value < minimum:
            raise ValueError(f"must be at least {minimum}")
        return value
    return parse


def _parse_positive_float(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError("must be a number") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError("must be a positive number")
    return value


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_MAX_DURATION = 365 * 86400.0


def _parse_duration(raw: str) -> float:
    match = _DURATION.match(raw)
    if not match:
        raise ValueError("must be a duration such as 30s, 500ms, 2m or 1h")
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    if seconds > _MAX_DURATION:  # an overflowed float is infinite, which timers and aiohttp refuse
        raise ValueError("must be at most 365 days")
    return seconds


def _parse_grace(raw: str) -> float:
    return 0.0 if raw.strip() in ("0", "0s") else _parse_duration(raw)


_SIZE = re.compile(r"^\s*(\d+)\s*(b|kb|k|mb|m|gb|g|kib|mib|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024,
               "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
               "g": 1024**3, "gb": 1024**3, "gib": 1024**3}


def _parse_size(raw: str) -> int:
    match = _SIZE.match(raw)
    if not match:
        raise ValueError("must be a size such as 10MB, 512KB or a number of bytes")
    unit = match.group(2).lower() if match.group(2) else None
    size = int(match.group(1)) * _SIZE_UNITS[unit]
    if size <= 0:
        raise ValueError("must be greater than zero")
    return size


def _split(raw: str) -> list[str]:
    items = [item.strip() for item in raw.split(",") if item.strip()]
    if not items and raw.strip():
        # Only commas: a typo, not the empty list, which means "unset" (for MANAGEMENT_ALLOWED_IPS
        # and ALLOWED_MODELS that is "any": the opposite of a list meant to restrict).
        raise ValueError("lists nothing but commas; leave it empty to unset it")
    return items


def _parse_networks(raw: str) -> tuple[IPNetwork, ...]:
    networks = []
    for item in _split(raw):
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR range") from None
        if network.network_address != ipaddress.ip_interface(item).ip:
            # 10.0.0.1/8 would silently mean all of 10.0.0.0/8: these lists grant trust and access,
            # so an address with a prefix is taken as the typo it most likely is.
            raise ValueError(f"{item!r} has host bits set: write {network} for the range, or "
                             f"{ipaddress.ip_interface(item).ip}/{network.max_prefixlen} for the one address")
        networks.append(network)
    return tuple(networks)


def _parse_management_tokens(raw: str) -> tuple[str, ...]:
    tokens = tuple(_split(raw))
    if not tokens:
        raise ValueError("is required (generate one with `llm-proxy gen-secret`)")
    for position, token in enumerate(tokens, 1):
        if len(token) < 32:
            raise ValueError(f"token #{position} is shorter than 32 characters")
    return tokens


def _decode_key(item: str, position: int | None = None) -> bytes:
    which = "" if position is None else f"key #{position} "
    try:
        key = base64.b64decode(item.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{which}is not valid base64 (use `openssl rand -base64 32`)") from None
    if len(key) != 32:
        raise ValueError(f"{which}must decode to 32 bytes, got {len(key)}")
    return key


def _parse_encryption_key(raw: str) -> bytes:
    if not raw.strip():
        raise ValueError("is required (generate one with `openssl rand -base64 32`)")
    return _decode_key(raw)


def _parse_previous_keys(raw: str) -> tuple[bytes, ...]:
    return tuple(_decode_key(item, n) for n, item in enumerate(_split(raw), 1))


def _parse_url(raw: str) -> str:
    url = raw.strip().rstrip("/")
    if not re.match(r"^https?://[^/\s?#]+(/[^\s?#]*)?$", url):
        raise ValueError("must be an http:// or https:// URL without query or fragment")
    if url.endswith("/v1"):
        raise ValueError("must not end in /v1 (the gateway appends /v1/... itself)")
    return url


def _parse_listen(raw: str) -> tuple[str, int]:
    host, sep, port_text = raw.strip().rpartition(":")
    if not sep or not (port_text.isascii() and port_text.isdigit()):
        raise ValueError("must be host:port, e.g. :8080 or 127.0.0.1:8080")
    port = int(port_text)
    if port == 0:  # the system would pick a port, and no client could know which
        raise ValueError("port 0 is not allowed: give a port from 1 to 65535")
    if port > 65535:
        raise ValueError(f"port {port} is out of range: the port must be 1-65535")
    return host.strip("[]"), port


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_POSTGRES_SCHEMES = ("postgresql", "postgres")
_DATABASE_URL_FORMS = "empty (SQLite at DATABASE_PATH), sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DB"


def parse_database_url(raw: str) -> Path | str:
    """Return the SQLite file a sqlite:/// URL names, or the PostgreSQL URL as given (never echoed in an error)."""
    url = raw.strip()
    scheme = _SCHEME.match(url)
    if scheme is None:
        raise ValueError(f"must be {_DATABASE_URL_FORMS}")
    name = scheme.group(1).lower()
    if name == "sqlite":
        rest = url[scheme.end():]
        if not rest.startswith("/"):
            raise ValueError("a sqlite URL has no host: sqlite:///relative/path or sqlite:////absolute/path")
        if not rest[1:]:
            raise ValueError("sqlite:/// needs the database file's path after it")
        return Path(unquote(rest[1:]))
    if name not in _POSTGRES_SCHEMES:
        raise ValueError(f"the scheme {name}:// is not supported: {_DATABASE_URL_FORMS}")
    if any(character.isspace() or not character.isprintable() for character in url):
        raise ValueError("must not contain spaces or control characters")
    parts = urlsplit(url)
    if "," not in parts.netloc:  # several hosts (host1:5432,host2:5432) are asyncpg's to check
        try:
            parts.port  # noqa: B018 (reading it checks it)
        except ValueError:
            raise ValueError("has a port that is not a number from 0 to 65535") from None
    return url


def database_url_passwords(url: str) -> tuple[str, ...]:
    """Every password a database URL holds (in its user info or a password= parameter), as written and decoded."""
    parts = urlsplit(url)
    written = parts.password or ""
    decoded = [unquote(written)]
    decoded += [value for key, value in parse_qsl(parts.query, keep_blank_values=True) if key == "password"]
    forms = {written} | {form for password in decoded for form in (password, quote(password, safe=""))}
    return tuple(sorted(forms - {""}, key=len, reverse=True))  # longest first: a masked form hides no other


def redact_database_url(url: str) -> str:
    """Return a database URL fit to show: each password replaced by ***."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hosts = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{hosts}"
    query = "&".join(f"{pair.partition('=')[0]}=***" if unquote_plus(pair.partition("=")[0]) == "password" else pair
                     for pair in parts.query.split("&")) if parts.query else ""
    return urlunsplit(parts._replace(netloc=netloc, query=query))


_REDIS_SCHEMES = ("redis", "rediss", "unix")


def _parse_redis_url(raw: str) -> str:
    """Return a Redis URL as given (never echoed in an error): redis://, rediss:// (TLS) or unix://."""
    url = raw.strip()
    scheme = _SCHEME.match(url)
    if scheme is None or scheme.group(1).lower() not in _REDIS_SCHEMES:
        raise ValueError("must be redis://[:PASSWORD@]HOST:PORT/DB, rediss://… (TLS) or unix:///path/to/socket")
    if any(character.isspace() or not character.isprintable() for character in url):
        raise ValueError("must not contain spaces or control characters")
    try:
        urlsplit(url).port  # noqa: B018 (reading it checks it)
    except ValueError:
        raise ValueError("has a port that is not a number from 0 to 65535") from None
    return url


def _parse_instance_id(raw: str) -> str:
    value = raw.strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", value):
        raise ValueError("must be 1 to 64 letters, digits, '.', '_', ':' or '-', starting with a letter or digit")
    return value


def _parse_choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value
    return parse


def _parse_optional_path(raw: str) -> Path | None:
    return Path(raw.strip()) if raw.strip() else None


def _parse_endpoints(raw: str) -> tuple[str, ...]:
    endpoints = tuple(item.rstrip("/") for item in _split(raw))
    for item in endpoints:
        if not re.fullmatch(r"/v1(/[A-Za-z0-9._~-]+)*", item):
            raise ValueError(f"{item!r} must be a /v1/... path prefix")
    return endpoints


_ORIGIN = re.compile(r"(https?)://([a-z0-9.-]+|\[[0-9a-f:.]+\])(?::([0-9]{1,5}))?", re.IGNORECASE)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_origin(origin: str) -> str | None:
    """Return `scheme://host:port` in lower case, or None for anything but a plain http(s) origin."""
    match = _ORIGIN.fullmatch(origin)
    if match is None:
        return None
    scheme, host, port = match.group(1).lower(), match.group(2).lower(), match.group(3)
    number = int(port) if port else _DEFAULT_PORTS[scheme]
    return f"{scheme}://{host}:{number}" if 0 < number < 65536 else None



def _parse_origins(raw: str) -> tuple[str, ...]:
    origins = tuple(_split(raw))
    for origin in origins:
        if origin != "*" and normalize_origin(origin) is None:
            raise ValueError(f"{origin!r} must be an origin such as https://app.example.com")
    return origins


def load_settings(environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env") -> Settings:
    """Read every variable (process environment first, then `.env`) and validate it.

    Raises one ConfigError listing every invalid variable, so that one restart can fix them all.
    """
    source: dict[str, str] = {}
    if env_file is not None and Path(env_file).is_file():
        source.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    source.update(os.environ if environ is None else environ)
    problems: list[tuple[str, str]] = []

    def parsed(name: str, parse: Callable[[str], T], raw: str, stand_in: T) -> T:
        try:
            return parse(raw)
        except ValueError as exc:
            problems.append((name, str(exc)))
            return stand_in  # only lets the other variables be read: a problem stops the load

    def get(name: str, parse: Callable[[str], T], default: T) -> T:
        raw = source.get(name)
        if raw is None or (raw.strip() == "" and default is not None):
            return default
        return parsed(name, parse, raw, default)

    def required(name: str, parse: Callable[[str], T], stand_in: T) -> T:
        return parsed(name, parse, source.get(name, ""), stand_in)

    host, port = get("LISTEN_ADDR", _parse_listen, ("", 8080))
    database_path = get("DATABASE_PATH", lambda raw: Path(raw.strip()), Path("./data/llm-proxy.db"))
    # DATABASE_URL, when set, names the database: sqlite:///PATH wins over DATABASE_PATH.
    unset: Path | str = ""
    database = get("DATABASE_URL", parse_database_url, unset)
    settings = Settings(
        management_tokens=required("MANAGEMENT_TOKEN", _parse_management_tokens, ()),
        encryption_key=required("ENCRYPTION_KEY", _parse_encryption_key, b""),
        encryption_keys_previous=get("ENCRYPTION_KEY_PREVIOUS", _parse_previous_keys, ()),
        management_allowed_ips=get("MANAGEMENT_ALLOWED_IPS", _parse_networks, ()),
        openai_api_url=get("OPENAI_API_URL", _parse_url, "https://api.openai.com"),
        listen_host=host,
        listen_port=port,
        database_path=database if isinstance(database, Path) else database_path,
        database_url=database if isinstance(database, str) else "",
        log_level=get("LOG_LEVEL", _parse_choice(LOG_LEVELS), "info"),
        log_format=get("LOG_FORMAT", _parse_choice(("json", "text")), "json"),
        log_file=get("LOG_FILE", _parse_optional_path, None),
        audit_enabled=get("AUDIT_ENABLED", _parse_bool, True),
        # An explicitly empty AUDIT_LOG_FILE means "database only", so it is not defaulted.
        audit_log_file=(_parse_optional_path(source["AUDIT_LOG_FILE"]) if "AUDIT_LOG_FILE" in source
                        else Path("./data/audit.log")),
        audit_create_dir=get("AUDIT_CREATE_DIR", _parse_bool, True),
        audit_store_in_db=get("AUDIT_STORE_IN_DB", _parse_bool, True),
        audit_mask_client_ip=get("AUDIT_MASK_CLIENT_IP", _parse_bool, False),
        audit_retention_days=get("AUDIT_RETENTION_DAYS", _int_parser(1), 90),
        trusted_proxies=get("TRUSTED_PROXIES", _parse_networks, ()),
        cors_allowed_origins=get("CORS_ALLOWED_ORIGINS", _parse_origins, ()),
        allowed_endpoints=get("ALLOWED_ENDPOINTS", _parse_endpoints, DEFAULT_ALLOWED_ENDPOINTS),
        allowed_models=get("ALLOWED_MODELS", lambda raw: tuple(_split(raw)), ()),
        default_token_duration_minutes=get("DEFAULT_TOKEN_DURATION_MINUTES", _int_parser(1), 60),
        max_token_duration_minutes=get("MAX_TOKEN_DURATION_MINUTES", _int_parser(1), 43200),
        rate_limit_per_minute=get("RATE_LIMIT_PER_MINUTE", _int_parser(0), 600),
        ip_rate_limit=get("IP_RATE_LIMIT", _int_parser(0), 60),
        global_rate_limit=get("GLOBAL_RATE_LIMIT", _int_parser(0), 0),
        max_request_size=get("MAX_REQUEST_SIZE", _parse_size, 10 * 1024 * 1024),
        request_timeout=get("REQUEST_TIMEOUT", _parse_duration, 60.0),
        stream_idle_timeout=get("STREAM_IDLE_TIMEOUT", _parse_duration, 300.0),
        max_concurrent_requests=get("MAX_CONCURRENT_REQUESTS", _int_parser(1), 1000),
        tls_cert_file=get("TLS_CERT_FILE", _parse_optional_path, None),
        tls_key_file=get("TLS_KEY_FILE", _parse_optional_path, None),
        tls_min_version=get("TLS_MIN_VERSION", _parse_choice(("1.2", "1.3")), "1.2"),
        hsts_max_age=get("HSTS_MAX_AGE", _int_parser(0), 31536000),
        shutdown_grace=get("SHUTDOWN_GRACE", _parse_grace, 30.0),
        anomaly_max_ips_per_hour=get("ANOMALY_MAX_IPS_PER_HOUR", _int_parser(1), 10),
        anomaly_rate_factor=get("ANOMALY_RATE_FACTOR", _parse_positive_float, 10.0),
        anomaly_auto_suspend=get("ANOMALY_AUTO_SUSPEND", _parse_bool, False),
        redis_url=get("REDIS_URL", _parse_redis_url, ""),
        redis_failure_mode=get("REDIS_FAILURE_MODE", _parse_choice(("closed", "open")), "closed"),
        workers=get("WORKERS", _int_parser(1), 1),
        instance_id=get("INSTANCE_ID", _parse_instance_id, ""),
        admin_console=get("ADMIN_CONSOLE", _parse_bool, True),
    )
    invalid = {name for name, _ in problems}
    # Checks across variables, made only on values that parsed (a stand-in would give a false one).
    if (not invalid & {"DEFAULT_TOKEN_DURATION_MINUTES", "MAX_TOKEN_DURATION_MINUTES"}
            and settings.default_token_duration_minutes > settings.max_token_duration_minutes):
        problems.append(("DEFAULT_TOKEN_DURATION_MINUTES", "must not exceed MAX_TOKEN_DURATION_MINUTES"))
    if (settings.tls_cert_file is None) != (settings.tls_key_file is None):
        problems.append(("TLS_CERT_FILE" if settings.tls_cert_file is None else "TLS_KEY_FILE",
                         "TLS_CERT_FILE and TLS_KEY_FILE must be set together"))
    if not invalid & {"WORKERS", "REDIS_URL"} and settings.workers > 1 and not settings.redis_url:
        problems.append(("WORKERS", "more than 1 worker needs REDIS_URL (the workers share their limits through it)"))
    if problems:
        problems.sort(key=lambda problem: VARIABLES.index(problem[0]))  # the README table's order
        raise ConfigError(*problems[0], *problems[1:])
    return settings


def read_client_variable(name: str, env_file: str | Path = ".env") -> str | None:
    """Read a CLI-side variable (LLM_PROXY_URL, MANAGEMENT_TOKEN) from the environment, then `.env`."""
    value = os.environ.get(name)
    if value is None and Path(env_file).is_file():
        value = dotenv_values(env_file).get(name)
    return value.strip() if value and value.strip() else None


# Every gateway environment variable this module reads; the README's configuration table must match it.
VARIABLES = (
    "MANAGEMENT_TOKEN", "MANAGEMENT_ALLOWED_IPS", "ENCRYPTION_KEY", "ENCRYPTION_KEY_PREVIOUS",
    "OPENAI_API_URL", "LISTEN_ADDR", "DATABASE_PATH", "DATABASE_URL", "LOG_LEVEL", "LOG_FORMAT", "LOG_FILE",
    "AUDIT_ENABLED", "AUDIT_LOG_FILE", "AUDIT_CREATE_DIR", "AUDIT_STORE_IN_DB", "AUDIT_MASK_CLIENT_IP",
    "AUDIT_RETENTION_DAYS", "TRUSTED_PROXIES", "CORS_ALLOWED_ORIGINS", "ALLOWED_ENDPOINTS",
    "ALLOWED_MODELS", "DEFAULT_TOKEN_DURATION_MINUTES", "MAX_TOKEN_DURATION_MINUTES",
    "RATE_LIMIT_PER_MINUTE", "IP_RATE_LIMIT", "GLOBAL_RATE_LIMIT", "MAX_REQUEST_SIZE", "REQUEST_TIMEOUT",
    "STREAM_IDLE_TIMEOUT", "MAX_CONCURRENT_REQUESTS", "TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_MIN_VERSION",
    "HSTS_MAX_AGE", "SHUTDOWN_GRACE", "ANOMALY_MAX_IPS_PER_HOUR", "ANOMALY_RATE_FACTOR",
    "ANOMALY_AUTO_SUSPEND", "REDIS_URL", "REDIS_FAILURE_MODE", "WORKERS", "INSTANCE_ID", "ADMIN_CONSOLE",
)

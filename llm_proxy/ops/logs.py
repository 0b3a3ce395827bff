"""Application logging: JSON or text lines, written off the event loop, secrets masked, one access line per request."""

from __future__ import annotations

import copy
import io
import logging
import logging.handlers
import os
import queue
import sys
import threading
from collections import deque
from datetime import UTC, datetime
from time import perf_counter
from time import time as time_now
from typing import Any, TextIO

import orjson
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from llm_proxy.audit.masking import mask_request_id, mask_secrets, mask_secrets_cached
from llm_proxy.gateway.client_auth import CREDENTIAL
from llm_proxy.gateway.context import CLIENT_IP, REQUEST_ID, REQUEST_STARTED
from llm_proxy.ops.control_characters import escape_controls
from llm_proxy.settings import ConfigError, Settings

ACCESS_LOGGER = "llm_proxy.access"
ACCESS_FLUSH_INTERVAL = 0.05
# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}

class SecretMaskingFilter(logging.Filter):
    """Scrub the final message, traceback and string extras of every record that reaches a handler."""

    _exceptions = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # bad %-args: still log, and still masked
            message = f"{record.msg!s} {record.args!r}"
        record.msg, record.args = mask_secrets(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._exceptions.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_secrets(record.exc_text)
        if record.stack_info:
            record.stack_info = mask_secrets(record.stack_info)
        for key, value in list(vars(record).items()):
            if key not in _STANDARD and not key.startswith("_"):
                if key == "request_id" and isinstance(value, str):
                    setattr(record, key, mask_request_id(value))
                else:
                    setattr(record, key, _mask_value(value))
        return True


def _mask_value(value: Any) -> Any:
    if isinstance(value, str):
        return mask_secrets(value)
    if isinstance(value, dict):
        return {key: _mask_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set):
        return [_mask_value(item) for item in value]
    if value is None or isinstance(value, int | float):
        return value
    return mask_secrets(str(value))  # anything else is logged as its str() anyway


_second_cache: tuple[int, str] = (-1, "")


def _utc(created: float) -> str:
    """Format a Unix time as UTC ISO-8601 to the millisecond; the date-time part is cached per second."""
    global _second_cache
    second = int(created)
    if second != _second_cache[0]:
        _second_cache = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{_second_cache[1]}.{int((created - second) * 1000):03d}Z"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in vars(record).items() if key not in _STANDARD and not key.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, then the record's extras."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": _utc(record.created),
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        for key, value in _extras(record).items():
            document.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            document["exception"] = record.exc_text
        if record.stack_info:
            document["stack"] = record.stack_info
        return orjson.dumps(document, default=str).decode()


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value …` for people reading a terminal; one line per record.

    Control characters are escaped in the whole line, traceback included (its newlines show as
    `\\n`): a message or extra carrying a client's text could otherwise forge a second line or
    send escape sequences to the terminal reading the log.
    """

    # The access line already says these in its message.
    _IN_MESSAGE = frozenset({"method", "path", "status"})

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _utc(record.created)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        extras = " ".join(f"{key}={value}" for key, value in _extras(record).items()
                          if key not in self._IN_MESSAGE and value is not None)
        return f"{line} {extras}" if extras else line

    def format(self, record: logging.LogRecord) -> str:
        return escape_controls(super().format(record))


LOG_FILE_MODE = 0o640  # as the audit file, and as logrotate.conf's `create 0640` makes them after a rotation


class _LogFileHandler(logging.handlers.WatchedFileHandler):
    """A WatchedFileHandler that creates its file 0640 (not the umask's 0644), also when it reopens it."""

    def _open(self) -> io.TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, LOG_FILE_MODE)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)


def _handler(settings: Settings, stream: TextIO | None) -> logging.Handler:
    if settings.log_file is None:
        return logging.StreamHandler(stream if stream is not None else sys.stderr)
    try:
        # Reopens when the path's (st_dev, st_ino) changes: logrotate's rename + create needs no signal.
        return _LogFileHandler(settings.log_file, encoding="utf-8")
    except OSError as exc:
        raise ConfigError("LOG_FILE", f"cannot open {settings.log_file} for appending ({exc.strerror})") from None


class _QueueHandler(logging.handlers.QueueHandler):
    """Merge message and args now (they may change later), but keep the traceback apart from the message."""

    _exceptions = logging.Formatter()

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        try:
            message = record.getMessage()
        except Exception:  # bad %-args: still log
            message = f"{record.msg!s} {record.args!r}"
        exc_text = record.exc_text
        if record.exc_info and not exc_text:
            exc_text = self._exceptions.formatException(record.exc_info)
        record = copy.copy(record)
        record.message = record.msg = message
        record.args, record.exc_info, record.exc_text = None, None, exc_text
        return record


# What a request leaves for its access line: (time, request id, method, path as received, status,
# duration in seconds, client IP, token hint). Rendered later, in the sink's thread.
AccessEntry = tuple[float, str | None, str, str, int, float, str | None, str | None]
_ACCESS_FIELDS = ("request_id", "method", "path", "status", "duration_ms", "client_ip", "token_id")


class AccessSink:
    """Access entries collected without waking any thread, rendered and written in batches.

    A request costs one tuple on a deque; a thread wakes every ACCESS_FLUSH_INTERVAL seconds,
    renders what has gathered (masking each path) and writes it in one call (through the
    destination handler, so LOG_FILE still follows logrotate). Handing every line to the logging
    queue woke the writer thread once per request; rendering each line on the event loop cost it
    ~40 µs a request under load (bench/ablate.py), where the same work done 50 ms' worth at a time
    stays in the CPU's caches.
    """

    def __init__(self, destination: logging.Handler, *, json: bool = True, logger_name: str = ACCESS_LOGGER) -> None:
        self._destination = destination
        self._json = json
        self._logger_name = logger_name
        self._lines: deque[AccessEntry] = deque()
        self._flushing = threading.Lock()  # two flushers must not reorder lines between them
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llm-proxy-access-log", daemon=True)

    def append(self, entry: AccessEntry) -> None:
        """Queue one request's entry (from the event loop; never blocks)."""
        self._lines.append(entry)

    def render(self, entry: AccessEntry) -> str:
        """Format one entry as a JSON or text line; the path is masked, the query string never logged."""
        created, request_id, method, path, status, duration, client_ip, token_id = entry
        # The query string can carry secrets (?api_key=…) and was never kept; the path alone
        # identifies the route, and is still masked in case a secret was put in the path itself.
        path = mask_secrets_cached(path)
        if request_id is not None:
            request_id = mask_request_id(request_id)  # it may be the client's X-Request-ID
        values = (request_id, method, path, status, round(duration * 1000, 3), client_ip, token_id)
        message = f"{method} {path} {status}"
        if self._json:
            return orjson.dumps({"time": _utc(created), "level": "info", "logger": self._logger_name,
                                 "message": message, **dict(zip(_ACCESS_FIELDS, values, strict=True))}).decode()
        extras = " ".join(f"{key}={value}" for key, value in zip(_ACCESS_FIELDS, values, strict=True)
                          if key not in ("method", "path", "status") and value is not None)
        # The path is the decoded one: `%0a` in a request would otherwise start a forged line.
        return escape_controls(f"{_utc(created)} INFO {self._logger_name}: {message} {extras}")

    def start(self) -> None:
        """Start the writer thread."""
        self._thread.start()

    def flush(self) -> None:
        """Write everything gathered so far."""
        if not self._lines:
            return
        with self._flushing:
            self._write_gathered()

    def _write_gathered(self) -> None:
        lines = []
        while self._lines:
            entry = self._lines.popleft()
            try:
                lines.append(self.render(entry))
            except Exception:
                # One bad entry must not stop the thread (and leave the deque to grow): say so instead.
                logging.getLogger(__name__).exception("an access line could not be rendered; it is left out")
        if not lines:
            return
        handler = self._destination
        handler.acquire()
        try:
            if isinstance(handler, logging.handlers.WatchedFileHandler):
                handler.reopenIfNeeded()
            stream = getattr(handler, "stream", None)
            if stream is not None:
                stream.write("\n".join(lines) + "\n")
                stream.flush()
        except (OSError, ValueError):
            pass  # as logging does: a log that cannot be written must not stop the gateway
        finally:
            handler.release()

    def _run(self) -> None:
        while not self._stopping.wait(ACCESS_FLUSH_INTERVAL):
            self.flush()
        self.flush()

    def stop(self) -> None:
        """Write what is left and stop the thread; safe to call twice."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        self.flush()


class LogListener(logging.handlers.QueueListener):
    """The thread that writes log records; stop() drains it, closes the destination and detaches from root."""

    def __init__(self, log_queue: queue.Queue[Any], queue_handler: logging.Handler,
                 *handlers: logging.Handler, access_json: bool = True) -> None:
        super().__init__(log_queue, *handlers, respect_handler_level=True)
        self.queue_handler = queue_handler
        self.access = AccessSink(handlers[0], json=access_json)

    def start(self) -> None:
        """Start the record writer and the access-line writer."""
        super().start()
        self.access.start()

    def handle(self, record: logging.LogRecord) -> None:
        # Access lines gathered before this record are written before it: one order in the file.
        self.access.flush()
        marker = getattr(record, "_flushed", None)
        if isinstance(marker, threading.Event):
            marker.set()
            return
        super().handle(record)

    def flush(self, timeout: float = 5.0) -> bool:
        """Block until every record queued so far is written (for tests and orderly shutdown)."""
        self.access.flush()
        marker = threading.Event()
        record = logging.makeLogRecord({"_flushed": marker})
        self.queue.put_nowait(record)
        return marker.wait(timeout)

    def stop(self) -> None:
        """Write what is queued, stop the thread, close the destination; safe to call twice."""
        global _access_sink
        logging.getLogger().removeHandler(self.queue_handler)
        if _access_sink is self.access:
            _access_sink = None
        self.access.stop()
        if self._thread is not None:
            super().stop()
        for handler in self.handlers:
            handler.close()


def configure_logging(settings: Settings, *, stream: TextIO | None = None) -> LogListener:
    """Route every logger through a queue to one masked JSON or text destination; return the started listener.

    Raises ConfigError naming LOG_FILE when that file cannot be opened.
    """
    destination = _handler(settings, stream)
    destination.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    destination.addFilter(SecretMaskingFilter())
    # Unbounded on purpose: a bounded queue makes QueueHandler print tracebacks to stderr when full.
    log_queue: queue.Queue[Any] = queue.Queue()
    queue_handler = _QueueHandler(log_queue)
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(queue_handler)
    root.setLevel(settings.log_level.upper())
    listener = LogListener(log_queue, queue_handler, destination, access_json=settings.log_format == "json")
    listener.start()
    global _access_sink
    _access_sink = listener.access
    return listener


# Where AccessLogger puts its lines once configure_logging() ran (aiohttp builds the logger itself).
_access_sink: AccessSink | None = None


class AccessLogger(AbstractAccessLogger):
    """One line per request: request id, method, path (never the query string), status, duration, client, token."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        started = request.get(REQUEST_STARTED)
        credential = request.get(CREDENTIAL)
        entry: AccessEntry = (
            time_now(), request.get(REQUEST_ID), request.method, request.path, response.status,
            (perf_counter() - started) if started is not None else time,
            request.get(CLIENT_IP) or request.remote,
            getattr(credential, "hint", None))  # obfuscated already
        sink = _access_sink
        if sink is not None:
            sink.append(entry)
            return
        # Logging not configured by configure_logging(): use the logger as is.
        self.logger.info("%s %s %s", request.method, mask_secrets_cached(request.path), response.status,
                         extra=dict(zip(_ACCESS_FIELDS, (entry[1], entry[2], mask_secrets_cached(entry[3]), entry[4],
                                                         round(entry[5] * 1000, 3), entry[6], entry[7]), strict=True)))

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

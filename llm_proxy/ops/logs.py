"""Application logging: every logger through one queue to one masked destination, written off the event loop."""

from __future__ import annotations

import copy
import io
import logging
import logging.handlers
import os
import queue
import sys
import threading
from typing import Any, TextIO

from llm_proxy.ops.access_log import AccessSink, attach, detach
from llm_proxy.ops.log_format import InstanceFilter, JsonFormatter, SecretMaskingFilter, TextFormatter
from llm_proxy.settings import ConfigError, Settings

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


class LogListener(logging.handlers.QueueListener):
    """The thread that writes log records; stop() drains it, closes the destination and detaches from root."""

    def __init__(self, log_queue: queue.Queue[Any], queue_handler: logging.Handler,
                 *handlers: logging.Handler, access_json: bool = True, instance: str = "") -> None:
        super().__init__(log_queue, *handlers, respect_handler_level=True)
        self.queue_handler = queue_handler
        self.access = AccessSink(handlers[0], json=access_json, instance=instance)

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
        logging.getLogger().removeHandler(self.queue_handler)
        detach(self.access)
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
    if settings.instance_id:  # which process wrote the line, where several write one file or one collector
        destination.addFilter(InstanceFilter(settings.instance_id))
    # Unbounded on purpose: a bounded queue makes QueueHandler print tracebacks to stderr when full.
    log_queue: queue.Queue[Any] = queue.Queue()
    queue_handler = _QueueHandler(log_queue)
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(queue_handler)
    root.setLevel(settings.log_level.upper())
    listener = LogListener(log_queue, queue_handler, destination, access_json=settings.log_format == "json",
                           instance=settings.instance_id)
    listener.start()
    attach(listener.access)
    return listener



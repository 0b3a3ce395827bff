"""How a log record reads: one JSON object or one text line, with anything secret-shaped masked."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import orjson

from llm_proxy.audit.masking import mask_request_id, mask_secrets
from llm_proxy.ops.control_characters import escape_controls

# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}

class InstanceFilter(logging.Filter):
    """Name the process (INSTANCE_ID) in every record that does not name one itself."""

    def __init__(self, instance: str) -> None:
        super().__init__()
        self._instance = instance

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "instance"):
            record.instance = self._instance
        return True


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


def utc(created: float) -> str:
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
            "time": utc(record.created),
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
        return utc(record.created)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        extras = " ".join(f"{key}={value}" for key, value in _extras(record).items()
                          if key not in self._IN_MESSAGE and value is not None)
        return f"{line} {extras}" if extras else line

    def format(self, record: logging.LogRecord) -> str:
        return escape_controls(super().format(record))

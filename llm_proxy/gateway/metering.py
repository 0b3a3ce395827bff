"""Meter token usage from the upstream's own numbers, asking streams for them and hiding what was not asked for."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import orjson

from llm_proxy.gateway.bodies import refusing_deep_nesting

# Endpoints whose answers carry a `usage` object.
USAGE_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
# Streams that only report usage when asked with stream_options.include_usage.
_ASK_FOR_USAGE = ("/v1/chat/completions", "/v1/completions")
_MAX_JSON_BODY = 16 * 1024 * 1024  # answers larger than this are relayed but not parsed for usage
# An SSE event ends with an empty line; a line ends with CRLF, LF or CR, and the three may be mixed.
# The atomic groups keep a CRLF from being read as CR + LF, an empty line that is not there.
_EVENT_END = re.compile(rb"(?>\r\n|\n|\r)(?>\r\n|\n|\r)")
_USAGE_REQUESTED = b'"stream_options":{"include_usage":true}'
_ABSENT = object()  # a key not in the request at all (not even as null)
_MAX_PENDING = 64 * 1024  # an unterminated event held back past this is relayed (or, read-along, dropped)
_NOT_PROMPT_TEXT = frozenset({"role", "type", "name", "tool_call_id", "id"})


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated: bool = False


def _usage_from(document: Any) -> Usage | None:
    """Read chat/completions/embeddings (`prompt_tokens`…) or responses (`input_tokens`…) usage."""
    if not isinstance(document, dict):
        return None
    usage = document.get("usage")
    if not isinstance(usage, dict):
        response = document.get("response")  # a /v1/responses stream's response.completed event
        usage = response.get("usage") if isinstance(response, dict) else None
        if not isinstance(usage, dict):
            return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    total = usage.get("total_tokens")
    return Usage(prompt, completion, total if isinstance(total, int) else prompt + completion)


def _prompt_characters(document: Any) -> int:
    """Count the characters of every string in the request's prompt-bearing fields."""
    total = 0
    stack = [document.get(key) for key in ("messages", "prompt", "input", "instructions")]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(value for key, value in item.items() if key not in _NOT_PROMPT_TEXT)
    return total


class UsageTap:
    """Watch one answer go by; for streams we asked usage of, drop the extra usage-only event.

    What the answer is decides how it is read (begin()): an SSE stream event by event, a JSON
    document whole, anything else not at all.
    """

    def __init__(self, request: dict[str, Any] | None, request_size: int, hide_usage_event: bool) -> None:
        self._request = request  # None: a body the gateway could not read as a JSON object
        self._request_size = request_size
        # Until the answer says what it is (begin()), what the client asked for: a client that
        # leaves before the upstream's headers is charged the estimate of a stream it asked for.
        self.streamed = request is not None and request.get("stream") is True
        self._hide = hide_usage_event
        self._metering = True
        self._pending = b""
        self._json: list[bytes] = []
        self._json_size = 0
        self._content_events = 0
        self.usage: Usage | None = None

    def begin(self, content_type: str) -> bool:
        """Match the tap to the answer's type; return False (and stop metering) for one it cannot read."""
        if content_type == "text/event-stream":
            self.streamed = True
        elif content_type == "application/json":
            self.streamed, self._hide = False, False  # a stream was asked for, a document came
        else:
            self.stop()
        return self._metering

    def stop(self) -> None:
        """Meter nothing for this answer (an error, or a type that carries no usage)."""
        self._metering = False

    def feed(self, chunk: bytes) -> bytes:
        """Take a chunk from the upstream; return the bytes to send to the client now."""
        if not self.streamed:
            self._json_size += len(chunk)
            if self._json_size <= _MAX_JSON_BODY:
                self._json.append(chunk)
            return chunk
        data = self._pending + chunk
        cut = _complete_end(data, max(0, len(self._pending) - 3))  # the pending part holds no end of event
        complete, pending = data[:cut], data[cut:]
        if len(pending) > _MAX_PENDING:
            # No usage event is this large: stop holding it (memory stays bounded, bytes keep flowing).
            if self._hide:
                complete, pending = data, b""
            else:
                pending = b""
        self._pending = pending
        if not self._hide:
            # Nothing to rewrite: the chunk goes on untouched; only read along.
            for event in _events(complete):
                self._inspect(event)
            return chunk
        return self._filter(complete)

    def finish(self) -> bytes:
        """Return whatever was held back (an unterminated last event) once the upstream is done."""
        if not self.streamed:
            if self._json_size <= _MAX_JSON_BODY:
                try:
                    self.usage = _usage_from(orjson.loads(b"".join(self._json)))
                except orjson.JSONDecodeError:
                    pass
            self._json = []
            return b""
        pending, self._pending = self._pending, b""
        if not pending:
            return b""
        if self._hide:
            return self._filter(pending)
        self._inspect(pending)  # already relayed by feed()
        return b""

    def _filter(self, complete: bytes) -> bytes:
        kept = [event for event in _events(complete) if not self._inspect(event)]
        return b"".join(kept)

    def _inspect(self, event: bytes) -> bool:
        """Note what an event says; return True when it is the usage-only event to hide."""
        # Text delivered: chat and completions content, tool-call arguments, /v1/responses deltas.
        if b'"content"' in event or b'"arguments"' in event or b'.delta"' in event:
            self._content_events += 1
        if b'"usage"' not in event:
            return False
        lines = [line[5:] for line in event.splitlines() if line.startswith(b"data:")]
        # The event's data is its data lines joined by LF (one leading space dropped from each);
        # an upstream that put a JSON document on each line is read line by line as well.
        joined = b"\n".join(line[1:] if line.startswith(b" ") else line for line in lines)
        for text in (joined, *lines) if len(lines) > 1 else (joined,):
            try:
                document = orjson.loads(text)
            except orjson.JSONDecodeError:
                continue
            found = _usage_from(document)
            if found is not None:
                self.usage = found
                return self._hide and document.get("choices") == []
        return False

    def result(self) -> Usage | None:
        """Return the upstream's usage or, for a stream cut short, an estimate of what was delivered."""
        if not self._metering:
            return None
        if self.usage is not None or not self.streamed:
            return self.usage
        # The documented fallback: about one token per content event delivered, and four prompt
        # characters per token (of the whole body when it could not be read).
        characters = self._request_size if self._request is None else _prompt_characters(self._request)
        prompt = math.ceil(characters / 4)
        return Usage(prompt, self._content_events, prompt + self._content_events, estimated=True)


def _complete_end(data: bytes, start: int = 0) -> int:
    """Return the length of the prefix of `data` made of complete SSE events (none ends before `start`)."""
    end = 0
    for match in _EVENT_END.finditer(data, start):
        if match.end() == len(data) and data.endswith(b"\r"):
            break  # a CR last in the data may be the first half of a CRLF still on its way
        end = match.end()
    return end


def _events(data: bytes) -> list[bytes]:
    """Split complete SSE events, keeping each event's terminator so bytes pass through unchanged."""
    events, start = [], 0
    for match in _EVENT_END.finditer(data):
        events.append(data[start:match.end()])
        start = match.end()
    if start < len(data):
        events.append(data[start:])
    return events


def prepare(path: str, body: bytes, document: dict[str, Any] | None) -> tuple[bytes, UsageTap | None]:
    """Decide how to meter a request; for chat/completions streams, ask the upstream to report usage.

    A body the gateway cannot read as a JSON object (document None) on a metered endpoint is still
    metered, from whatever the upstream answers: a client cannot dodge its budget with a body only
    the upstream's parser accepts.
    """
    if not path.startswith(USAGE_ENDPOINTS):
        return body, None
    if document is None:
        return body, UsageTap(None, len(body), hide_usage_event=False)
    hide = False
    if document.get("stream") is True and path.startswith(_ASK_FOR_USAGE):
        options = document.get("stream_options", _ABSENT)
        if options is _ABSENT:
            # Added before the closing brace: every other byte of the body reaches the upstream
            # as the client sent it (re-encoding would, for one, turn integers past 64 bits into floats).
            end = body.rindex(b"}")
            body = body[:end] + b"," + _USAGE_REQUESTED + body[end:]
            hide = True
        elif options is None or (isinstance(options, dict) and options.get("include_usage") is not True):
            # Set that one field. The body is re-encoded with the standard library, which keeps
            # integers of any size exact (orjson reads those past 64 bits as floats).
            with refusing_deep_nesting():
                exact = json.loads(body)
                exact["stream_options"] = {**(exact.get("stream_options") or {}), "include_usage": True}
                body = json.dumps(exact, ensure_ascii=False, separators=(",", ":")).encode()
            hide = True
        # stream_options of another type is sent as it came: the upstream answers what it makes of it.
    return body, UsageTap(document, len(body), hide)

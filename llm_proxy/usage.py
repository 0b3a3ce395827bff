"""Meter token usage from the upstream's own numbers, asking streams for them and hiding what was not asked for."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson

# Endpoints whose answers carry a `usage` object.
USAGE_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
# Streams that only report usage when asked with stream_options.include_usage.
_ASK_FOR_USAGE = ("/v1/chat/completions", "/v1/completions")
_MAX_JSON_BODY = 16 * 1024 * 1024  # answers larger than this are relayed but not parsed for usage
_EVENT_END = (b"\n\n", b"\r\n\r\n", b"\r\r")
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
    """Watch one answer go by; for streams we asked usage of, drop the extra usage-only event."""

    def __init__(self, request: dict[str, Any], streamed: bool, hide_usage_event: bool) -> None:
        self._request = request
        self.streamed = streamed
        self._hide = hide_usage_event
        self._pending = b""
        self._json: list[bytes] = []
        self._json_size = 0
        self._content_events = 0
        self.usage: Usage | None = None

    def feed(self, chunk: bytes) -> bytes:
        """Take a chunk from the upstream; return the bytes to send to the client now."""
        if not self.streamed:
            self._json_size += len(chunk)
            if self._json_size <= _MAX_JSON_BODY:
                self._json.append(chunk)
            return chunk
        data = self._pending + chunk
        cut = _complete_end(data)
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
        if b'"content"' in event:
            self._content_events += 1
        if b'"usage"' not in event:
            return False
        for line in event.splitlines():
            if not line.startswith(b"data:"):
                continue
            try:
                document = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                continue
            found = _usage_from(document)
            if found is not None:
                self.usage = found
                return self._hide and document.get("choices") == []
        return False

    def result(self) -> Usage | None:
        """Return the upstream's usage or, for a stream cut short, an estimate of what was delivered."""
        if self.usage is not None or not self.streamed:
            return self.usage
        # The documented fallback: about one token per content event delivered, and four prompt
        # characters per token.
        prompt = math.ceil(_prompt_characters(self._request) / 4)
        return Usage(prompt, self._content_events, prompt + self._content_events, estimated=True)


def _complete_end(data: bytes) -> int:
    """Return the length of the prefix of `data` made of complete SSE events."""
    ends = [index + len(marker) for marker in _EVENT_END if (index := data.rfind(marker)) >= 0]
    return max(ends, default=0)


def _events(data: bytes) -> list[bytes]:
    """Split complete SSE events, keeping each event's terminator so bytes pass through unchanged."""
    events, start = [], 0
    while start < len(data):
        ends = [(data.find(marker, start), marker) for marker in _EVENT_END]
        found = [(index, marker) for index, marker in ends if index >= 0]
        if not found:
            events.append(data[start:])
            break
        index, marker = min(found)
        events.append(data[start:index + len(marker)])
        start = index + len(marker)
    return events


def prepare(path: str, body: bytes, document: dict[str, Any] | None) -> tuple[bytes, UsageTap | None]:
    """Decide how to meter a request; for chat/completions streams, ask the upstream to report usage."""
    if document is None or not path.startswith(USAGE_ENDPOINTS):
        return body, None
    streamed = document.get("stream") is True
    hide = False
    if streamed and path.startswith(_ASK_FOR_USAGE):
        options = document.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage") is True):
            options = dict(options) if isinstance(options, dict) else {}
            options["include_usage"] = True
            document = {**document, "stream_options": options}
            body = orjson.dumps(document)
            hide = True
    return body, UsageTap(document, streamed, hide)

"""Escaping of control characters (C0, DEL, C1, line and paragraph separators) for logs and the terminal."""

from __future__ import annotations

import unicodedata

from llm_proxy.ops.control_characters import escape_controls


def test_every_control_character_is_escaped_and_nothing_else() -> None:
    controls = [chr(code) for code in range(0x110000)
                if unicodedata.category(chr(code)) == "Cc" or code in (0x2028, 0x2029)]
    assert len(controls) == 67
    for char in controls:
        escaped = escape_controls(f"a{char}b")
        assert escaped.isascii() and escaped.isprintable() and escaped.startswith("a\\") and escaped.endswith("b")
    assert escape_controls("\n\t\x7f\x9b\u2029") == "\\n\\x09\\x7f\\x9b\\u2029"
    ordinary = "GET /v1/models/café-ü 200 request_id=req-1 \\n stays as typed \u00a0\u200b"
    assert escape_controls(ordinary) == ordinary

"""Escape control characters, so that text a client chose can neither split a log line nor drive a terminal."""

# Every character of Unicode category Cc (C0, DEL, C1: U+009B is an 8-bit CSI) and the two
# Unicode line separators: a newline shows as `\n`, the others as `\xNN` / `\uNNNN`.
_CONTROLS = (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)
_ESCAPES = str.maketrans({code: "\\n" if code == 0x0A else f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"
                          for code in _CONTROLS})


def escape_controls(text: str) -> str:
    """Return `text` with every control character and line separator written as an escape."""
    # isprintable() is False for each of them and ~10× cheaper than translate(): most text skips it.
    return text if text.isprintable() else text.translate(_ESCAPES)

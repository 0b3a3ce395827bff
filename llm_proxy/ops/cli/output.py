"""What a command prints: aligned tables and records with control characters escaped, or indented JSON."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from typing import Any

import orjson

from llm_proxy.ops.control_characters import escape_controls


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    # A stored name may hold ESC or U+009B (CSI): printed raw, it would drive the operator's terminal.
    return escape_controls(str(value))


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Return rows as left-aligned columns under upper-case headers, two spaces apart, controls escaped."""
    cells = [[header.upper() for header in headers], *([_cell(value) for value in row] for row in rows)]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headers))]
    return "\n".join("  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def format_record(document: dict[str, Any], fields: Sequence[str]) -> str:
    """Return one object as aligned `field  value` lines, controls escaped."""
    width = max(len(field) for field in fields)
    return "\n".join(f"{field.ljust(width)}  {_cell(document.get(field))}".rstrip() for field in fields)


def print_json(document: Any) -> None:
    """Print a document as indented JSON."""
    print(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())


def show(args: argparse.Namespace, document: Any, fields: Sequence[str]) -> None:
    """Print one object as a record of `fields`, or as JSON with --json."""
    if args.json:
        print_json(document)
    else:
        print(format_record(document, fields))


def show_list(args: argparse.Namespace, document: Any, columns: Sequence[str]) -> None:
    """Print a `{"data": [...]}` listing as a table of `columns`, or as JSON with --json."""
    if args.json:
        print_json(document)
    else:
        rows = document.get("data", []) if isinstance(document, dict) else []
        print(format_table(columns, ([row.get(column) for column in columns] for row in rows)))

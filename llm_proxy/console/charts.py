"""The console's charts, drawn on the server as inline SVG: requests by status class and daily usage."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from markupsafe import Markup, escape

STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx", "other")
# Okabe–Ito: told apart under every common colour-vision deficiency. Fills are attributes, not CSS, so the
# charts read without the stylesheet and need no inline style under the console's CSP.
COLOURS = {"2xx": "#009E73", "3xx": "#56B4E9", "4xx": "#E69F00", "5xx": "#D55E00", "other": "#999999",
           "requests": "#0072B2", "tokens": "#D55E00"}
WIDTH, HEIGHT = 480, 240
_TOP, _BOTTOM, _LEFT, _MARGIN = 28, 216, 60, 8
_INK, _GRID = "#4a4a4a", "#c8c8c8"
_ID = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}\Z")


@dataclass(frozen=True)
class HourBucket:
    """Requests that started in one UTC hour, by status class (keys of STATUS_CLASSES; absent means 0)."""

    start: datetime
    counts: Mapping[str, int]

    def __post_init__(self) -> None:
        if self.start.tzinfo is None:
            raise ValueError("HourBucket.start must be timezone-aware")
        for name, count in self.counts.items():
            if name not in STATUS_CLASSES:
                raise ValueError(f"unknown status class {name!r}")
            _check_count(name, count)


@dataclass(frozen=True)
class DayUsage:
    """One UTC day of a project's usage."""

    day: date
    requests: int
    tokens: int

    def __post_init__(self) -> None:
        _check_count("requests", self.requests)
        _check_count("tokens", self.tokens)


def status_chart(buckets: Iterable[HourBucket], *, now: datetime, id_prefix: str = "requests") -> Markup:
    """Draw the 24 UTC hours up to the one holding `now` as stacked bars; buckets of other hours are left out."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    first = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=23)
    slots = [dict.fromkeys(STATUS_CLASSES, 0) for _ in range(24)]
    for bucket in buckets:
        index = (bucket.start.astimezone(UTC) - first) // timedelta(hours=1)
        if 0 <= index < 24:
            for name, count in bucket.counts.items():
                slots[index][name] += count
    sums = [sum(slot.values()) for slot in slots]
    total = sum(sums)
    if total:
        busiest = max(range(24), key=sums.__getitem__)
        by_class = ", ".join(f"{sum(slot[name] for slot in slots):,} {name}" for name in STATUS_CLASSES
                             if any(slot[name] for slot in slots))
        desc = (f"{_many(total, 'request')} in the last 24 hours: {by_class}; "
                f"busiest hour {first + timedelta(hours=busiest):%H}:00 UTC with {sums[busiest]:,}.")
    else:
        desc = "No requests in the last 24 hours."
    intervals, (top,) = _scales(max(sums))
    right = WIDTH - _MARGIN
    slot_width = (right - _LEFT) / 24
    body = _legend([(name, name, "rect") for name in STATUS_CLASSES], step=72)
    body += _grid(intervals, top, right, anchor="end", x=_LEFT - 6)
    for i, slot in enumerate(slots):
        hour = first + timedelta(hours=i)
        detail = ", ".join(f"{slot[name]:,} {name}" for name in STATUS_CLASSES if slot[name])
        label = f"{hour:%Y-%m-%d %H}:00–{hour + timedelta(hours=1):%H}:00 UTC: " + (
            f"{_many(sums[i], 'request')} ({detail})" if sums[i] else "no requests")
        x, width = _bar(_LEFT + i * slot_width, slot_width)
        body.append(f'<g class="chart-bar"><title>{escape(label)}</title>' + _hit(_LEFT + i * slot_width, slot_width))
        done = 0
        for name in STATUS_CLASSES:
            if slot[name]:
                low, done = _y(done, top), done + slot[name]
                high = _y(done, top)  # from the running total, so segments touch without rounding gaps
                body.append(_rect(f"chart-{name}", x, high, width, low - high, COLOURS[name]))
        body.append("</g>")
    labels = [(_LEFT + (i + 0.5) * slot_width, f"{(first + timedelta(hours=i)):%H}:00") for i in range(24)
              if (first + timedelta(hours=i)).hour % 3 == 0]
    body += _x_labels(labels)
    return _svg(id_prefix, "Requests over the last 24 hours by status class", desc, body)


def usage_chart(days: Iterable[DayUsage], *, project: str, id_prefix: str = "usage") -> Markup:
    """Draw daily requests as bars (left axis) and tokens as a line (right axis), oldest day left.

    Entries for the same day are added up; days missing between the first and the last count as zero.
    """
    merged: dict[date, tuple[int, int]] = {}
    for entry in days:
        requests, tokens = merged.get(entry.day, (0, 0))
        merged[entry.day] = (requests + entry.requests, tokens + entry.tokens)
    title = f"Daily requests and tokens for {project}"
    if not merged:
        return _svg(id_prefix, title, "No days to show.", _grid(0, 0, WIDTH - _LEFT - 4, anchor="end", x=_LEFT - 6))
    first, last = min(merged), max(merged)
    span = [first + timedelta(days=n) for n in range((last - first).days + 1)]
    rows = [(day, *merged.get(day, (0, 0))) for day in span]
    requests_total, tokens_total = sum(row[1] for row in rows), sum(row[2] for row in rows)
    period = f"{_many(len(rows), 'day')} from {first} to {last}"
    if requests_total or tokens_total:
        busiest = max(rows, key=lambda row: row[1])
        desc = (f"{period}: {_many(requests_total, 'request')} and {_many(tokens_total, 'token')}; "
                f"busiest day {busiest[0]} with {_many(busiest[1], 'request')}.")
    else:
        desc = f"{period}: no requests."
    intervals, (requests_top, tokens_top) = _scales(max(row[1] for row in rows), max(row[2] for row in rows))
    right = WIDTH - _LEFT - 4
    slot_width = (right - _LEFT) / len(rows)
    body = _legend([("requests", "Requests (left axis)", "rect"), ("tokens", "Tokens (right axis)", "line")], step=170)
    body += _grid(intervals, requests_top, right, anchor="end", x=_LEFT - 6)
    body += _grid(intervals, tokens_top, None, anchor="start", x=right + 5)
    points = []
    for i, (day, requests, tokens) in enumerate(rows):
        x, width = _bar(_LEFT + i * slot_width, slot_width)
        label = f"{day}: {_many(requests, 'request')}, {_many(tokens, 'token')}"
        body.append(f'<g class="chart-bar"><title>{escape(label)}</title>' + _hit(_LEFT + i * slot_width, slot_width))
        if requests:
            y = _y(requests, requests_top)
            body.append(_rect("chart-requests", x, y, width, _y(0, requests_top) - y, COLOURS["requests"]))
        body.append("</g>")
        points.append((_tenths(_LEFT + (i + 0.5) * slot_width), _y(tokens, tokens_top)))
    colour = COLOURS["tokens"]
    body.append(f'<g class="chart-tokens" fill="{colour}" stroke="{colour}"><polyline fill="none" stroke-width="2" '
                f'points="{" ".join(f"{_n(x)},{_n(y)}" for x, y in points)}"/>')
    body += [f'<circle cx="{_n(x)}" cy="{_n(y)}" r="2.5"/>' for x, y in points]
    body.append("</g>")
    every = -(-len(rows) // 7)
    body += _x_labels([(_LEFT + (i + 0.5) * slot_width, f"{day:%m-%d}") for i, (day, _, _) in enumerate(rows)
                       if (len(rows) - 1 - i) % every == 0])
    return _svg(id_prefix, title, desc, body)


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, not {value!r}")


def _many(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _nice(at_least: int) -> int:
    """Return the smallest 1, 2 or 5 × 10^n that is at least `at_least`."""
    power = 1
    while True:
        for factor in (1, 2, 5):
            if factor * power >= at_least:
                return factor * power
        power *= 10


def _scales(*peaks: int) -> tuple[int, list[int]]:
    """Choose one count of intervals (3 to 5) for every series, and each series' round top, wasting the least height."""
    live = [peak for peak in peaks if peak]
    if not live:
        return 0, [0 for _ in peaks]

    def top(peak: int, intervals: int) -> int:
        return intervals * _nice(max(1, -(-peak // intervals)))

    # At least 3 intervals where the counts allow it (a 0 … 1 axis is all a peak of 1 can have).
    intervals = min(range(min(3, *live), 6), key=lambda n: (max(top(peak, n) / peak for peak in live), -n))
    return intervals, [top(peak, intervals) for peak in peaks]


def _tenths(value: float) -> int:
    return round(value * 10)


def _n(tenths: int) -> str:
    whole, tenth = divmod(tenths, 10)
    return f"{whole}.{tenth}" if tenth else str(whole)


def _y(value: int, top: int) -> int:
    """Return the height of `value` on a scale of 0 … `top`, in tenths of a unit from the top of the viewBox."""
    return _tenths(_BOTTOM - (value * (_BOTTOM - _TOP) / top if top else 0))


def _bar(left: float, slot: float) -> tuple[int, int]:
    width = min(slot * 0.7, 40)
    return _tenths(left + (slot - width) / 2), _tenths(width)


def _rect(css: str, x: int, y: int, width: int, height: int, fill: str) -> str:
    return (f'<rect class="{css}" x="{_n(x)}" y="{_n(y)}" width="{_n(width)}" height="{_n(height)}" '
            f'fill="{fill}"/>')


def _hit(left: float, slot: float) -> str:
    """Return a transparent column so that hovering anywhere above a bar shows its numbers."""
    return (f'<rect class="chart-hit" x="{_n(_tenths(left))}" y="{_TOP}" width="{_n(_tenths(slot))}" '
            f'height="{_BOTTOM - _TOP}" fill="#ffffff" fill-opacity="0"/>')


def _tick(value: int) -> str:
    for size, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M")):
        if value >= size:
            return f"{Decimal(value) / size:,f}{suffix}"
    return f"{value:,}"


def _grid(intervals: int, top: int, right: int | None, *, anchor: str, x: int) -> list[str]:
    """Draw the horizontal grid (unless `right` is None) and a column of tick labels at `x`."""
    values = [top * i // intervals for i in range(intervals + 1)] if intervals else [0]
    parts = []
    if right is not None:
        parts.append(f'<g class="chart-grid" stroke="{_GRID}" stroke-width="1">')
        parts += [f'<line x1="{_LEFT}" x2="{right}" y1="{_n(_y(v, top))}" y2="{_n(_y(v, top))}"/>' for v in values]
        parts.append("</g>")
    parts.append(f'<g class="chart-axis" fill="{_INK}" text-anchor="{anchor}">')
    parts += [f'<text x="{x}" y="{_n(_y(v, top) + 40)}">{escape(_tick(v))}</text>' for v in values]
    return [*parts, "</g>"]


def _x_labels(labels: list[tuple[float, str]]) -> list[str]:
    texts = [f'<text x="{_n(_tenths(x))}" y="{_BOTTOM + 16}">{escape(text)}</text>' for x, text in labels]
    return [f'<g class="chart-axis" fill="{_INK}" text-anchor="middle">', *texts, "</g>"]


def _legend(items: list[tuple[str, str, str]], *, step: int) -> list[str]:
    parts = ['<g class="chart-legend">']
    for i, (key, text, mark) in enumerate(items):
        x = _LEFT + i * step
        colour = COLOURS[key]
        parts.append(f'<rect class="chart-{key}" x="{x}" y="4" width="12" height="12" fill="{colour}"/>'
                     if mark == "rect" else
                     f'<line class="chart-{key}" x1="{x}" x2="{x + 12}" y1="10" y2="10" stroke="{colour}" '
                     f'stroke-width="2"/>')
        parts.append(f'<text x="{x + 16}" y="15" fill="{_INK}">{escape(text)}</text>')
    return [*parts, "</g>"]


def _svg(id_prefix: str, title: str, desc: str, body: list[str]) -> Markup:
    if not _ID.match(id_prefix):
        raise ValueError(f"id_prefix must be a letter then letters, digits, '-' or '_', not {id_prefix!r}")
    title_id, desc_id = f"{id_prefix}-title", f"{id_prefix}-desc"
    # Safe: every piece of text in `body`, the title and the description went through escape().
    return Markup(  # noqa: S704
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart-svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-labelledby="{title_id}" aria-describedby="{desc_id}" '
        'font-family="system-ui, sans-serif" font-size="13">'
        f'<title id="{title_id}">{escape(title)}</title><desc id="{desc_id}">{escape(desc)}</desc>'
        + "".join(body) + "</svg>")

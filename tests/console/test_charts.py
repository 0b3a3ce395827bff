"""The console's SVG charts, parsed as XML: stacked bars and ticks in proportion, the text a screen reader
gets, escaping, the CSP's rules (no style, no script), empty and hostile input."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, timezone

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from markupsafe import Markup

from llm_proxy.console.charts import (
    COLOURS,
    HEIGHT,
    STATUS_CLASSES,
    WIDTH,
    DayUsage,
    HourBucket,
    status_chart,
    usage_chart,
)

SVG = "{http://www.w3.org/2000/svg}"
NS = {"svg": SVG[1:-1]}
NOW = datetime(2024, 12, 1, 14, 30, tzinfo=UTC)
HOUR = timedelta(hours=1)
PLOT = 216 - 28  # the bars' full height in the viewBox
HOSTILE = "<img src=x onerror=alert(1)>"


def parse(chart: Markup) -> ET.Element:
    assert isinstance(chart, Markup)
    return ET.fromstring(str(chart))  # noqa: S314 (our own output, not untrusted XML)


def bars(root: ET.Element) -> list[ET.Element]:
    return root.findall("svg:g[@class='chart-bar']", NS)


def segments(bar: ET.Element) -> list[ET.Element]:
    return [rect for rect in bar.findall("svg:rect", NS) if rect.get("class") != "chart-hit"]


def texts(root: ET.Element, anchor: str) -> list[str]:
    return [text.text or "" for group in root.findall(f"svg:g[@text-anchor='{anchor}']", NS)
            for text in group.findall("svg:text", NS)]


def test_status_bars_stack_in_class_order_in_proportion_to_counts() -> None:
    root = parse(status_chart([HourBucket(NOW, {"5xx": 10, "2xx": 200, "4xx": 50}),
                               HourBucket(NOW - 23 * HOUR, {"2xx": 100})], now=NOW))
    hours = bars(root)
    assert len(hours) == 24
    last = segments(hours[-1])
    assert [rect.get("class") for rect in last] == ["chart-2xx", "chart-4xx", "chart-5xx"]
    assert [rect.get("fill") for rect in last] == [COLOURS["2xx"], COLOURS["4xx"], COLOURS["5xx"]]
    bottom = 216.0
    for rect, count in zip(last, (200, 50, 10), strict=True):
        y, height = float(rect.get("y", "")), float(rect.get("height", ""))
        assert y + height == pytest.approx(bottom, abs=0.05)  # each sits on the one below
        assert height == pytest.approx(count / 300 * PLOT, abs=0.1)  # the axis tops out at 300
        bottom = y
    first = segments(hours[0])
    assert float(first[0].get("height", "")) == pytest.approx(float(last[0].get("height", "")) / 2, abs=0.1)
    assert all(not segments(bar) for bar in hours[1:-1])
    assert texts(root, "end") == ["0", "100", "200", "300"]


def test_status_text_for_screen_readers_and_tooltips() -> None:
    root = parse(status_chart([HourBucket(NOW, {"2xx": 1200, "4xx": 30, "5xx": 4}),
                               HourBucket(NOW - 5 * HOUR, {"2xx": 1})], now=NOW))
    assert root.get("role") == "img"
    assert root.findtext("svg:title", namespaces=NS) == "Requests over the last 24 hours by status class"
    assert root.findtext("svg:desc", namespaces=NS) == (
        "1,235 requests in the last 24 hours: 1,201 2xx, 30 4xx, 4 5xx; busiest hour 14:00 UTC with 1,234.")
    titles = [bar.findtext("svg:title", namespaces=NS) for bar in bars(root)]
    assert titles[0] == "2024-11-30 15:00–16:00 UTC: no requests"
    assert titles[18] == "2024-12-01 09:00–10:00 UTC: 1 request (1 2xx)"
    assert titles[23] == "2024-12-01 14:00–15:00 UTC: 1,234 requests (1,200 2xx, 30 4xx, 4 5xx)"
    assert texts(root, "middle") == ["15:00", "18:00", "21:00", "00:00", "03:00", "06:00", "09:00", "12:00"]
    legend = root.find("svg:g[@class='chart-legend']", NS)
    assert legend is not None
    assert [text.text for text in legend.findall("svg:text", NS)] == list(STATUS_CLASSES)


def test_status_buckets_are_placed_by_utc_hour_summed_and_outside_ones_dropped() -> None:
    paris = timezone(timedelta(hours=1))
    chart = status_chart([
        HourBucket(datetime(2024, 12, 1, 15, 10, tzinfo=paris), {"2xx": 2}),  # 14:10 UTC: the current hour
        HourBucket(NOW.replace(minute=59), {"2xx": 3, "other": 1}),
        HourBucket(NOW + HOUR, {"2xx": 1000}),  # the future
        HourBucket(NOW - 24 * HOUR, {"2xx": 1000}),  # a day ago: just outside
    ], now=NOW.astimezone(paris))
    root = parse(chart)
    assert bars(root)[-1].findtext("svg:title", namespaces=NS) == (
        "2024-12-01 14:00–15:00 UTC: 6 requests (5 2xx, 1 other)")
    assert root.findtext("svg:desc", namespaces=NS) == (
        "6 requests in the last 24 hours: 5 2xx, 1 other; busiest hour 14:00 UTC with 6.")


@pytest.mark.parametrize("buckets", [[], [HourBucket(NOW, {"2xx": 0, "5xx": 0})]])
def test_status_all_zero_is_an_empty_chart(buckets: list[HourBucket]) -> None:
    chart = status_chart(buckets, now=NOW)
    root = parse(chart)
    assert root.findtext("svg:desc", namespaces=NS) == "No requests in the last 24 hours."
    assert all(not segments(bar) for bar in bars(root))
    assert texts(root, "end") == ["0"]
    assert "nan" not in chart and "inf" not in chart


@pytest.mark.parametrize(("peak", "ticks"), [
    (1, ["0", "1"]), (2, ["0", "1", "2"]), (7, ["0", "2", "4", "6", "8"]), (12, ["0", "5", "10", "15"]),
    (100, ["0", "20", "40", "60", "80", "100"]),
])
def test_ticks_are_round_and_just_above_the_peak(peak: int, ticks: list[str]) -> None:
    assert texts(parse(status_chart([HourBucket(NOW, {"2xx": peak})], now=NOW)), "end") == ticks


def test_large_numbers_get_separators_and_round_ticks() -> None:
    root = parse(status_chart([HourBucket(NOW, {"2xx": 1_234_567}), HourBucket(NOW - HOUR, {"5xx": 1})], now=NOW))
    assert texts(root, "end") == ["0", "500,000", "1M", "1.5M"]
    assert root.findtext("svg:desc", namespaces=NS) == (
        "1,234,568 requests in the last 24 hours: 1,234,567 2xx, 1 5xx; busiest hour 14:00 UTC with 1,234,567.")
    huge = parse(status_chart([HourBucket(NOW, {"4xx": 10**18})], now=NOW))
    assert texts(huge, "end") == ["0", "200,000T", "400,000T", "600,000T", "800,000T", "1,000,000T"]
    (rect,) = segments(bars(huge)[-1])
    assert float(rect.get("height", "")) == pytest.approx(PLOT, abs=0.1)


def test_usage_bars_line_and_axes() -> None:
    days = [DayUsage(date(2024, 11, 28), 40, 2_000), DayUsage(date(2024, 12, 1), 10, 500),
            DayUsage(date(2024, 11, 28), 10, 0)]  # the same day twice adds up; 11-29 and 11-30 are missing
    root = parse(usage_chart(days, project="demo"))
    assert root.findtext("svg:title", namespaces=NS) == "Daily requests and tokens for demo"
    assert root.findtext("svg:desc", namespaces=NS) == (
        "4 days from 2024-11-28 to 2024-12-01: 60 requests and 2,500 tokens; busiest day 2024-11-28 with 50 requests.")
    columns = bars(root)
    assert [bar.findtext("svg:title", namespaces=NS) for bar in columns] == [
        "2024-11-28: 50 requests, 2,000 tokens", "2024-11-29: 0 requests, 0 tokens",
        "2024-11-30: 0 requests, 0 tokens", "2024-12-01: 10 requests, 500 tokens"]
    heights = [float(rect.get("height", "")) for bar in columns for rect in segments(bar)]
    assert len(heights) == 2 and heights[0] == pytest.approx(5 * heights[1], abs=0.1)
    assert texts(root, "end") == ["0", "10", "20", "30", "40", "50"]  # one grid for both axes
    assert texts(root, "start") == ["0", "500", "1,000", "1,500", "2,000", "2,500"]
    assert texts(root, "middle") == ["11-28", "11-29", "11-30", "12-01"]
    line = root.find("svg:g[@class='chart-tokens']/svg:polyline", NS)
    assert line is not None
    points = [tuple(map(float, point.split(","))) for point in line.get("points", "").split()]
    assert [y for _, y in points] == pytest.approx([216 - 0.8 * PLOT, 216, 216, 216 - 0.2 * PLOT], abs=0.1)


def test_usage_labels_every_few_days_ending_with_the_last() -> None:
    days = [DayUsage(date(2024, 10, 3) + timedelta(days=n), n, n * 1000) for n in range(90)]
    labels = texts(parse(usage_chart(days, project="p")), "middle")
    assert labels[-1] == "12-31" and len(labels) == 7


@pytest.mark.parametrize(("days", "desc"), [
    ([], "No days to show."),
    ([DayUsage(date(2024, 12, 1), 0, 0)], "1 day from 2024-12-01 to 2024-12-01: no requests."),
])
def test_usage_empty(days: list[DayUsage], desc: str) -> None:
    root = parse(usage_chart(days, project="p"))
    assert root.findtext("svg:desc", namespaces=NS) == desc
    assert all(not segments(bar) for bar in bars(root))


def test_a_hostile_project_name_is_text() -> None:
    chart = usage_chart([DayUsage(date(2024, 12, 1), 1, 1)], project=HOSTILE)
    assert "<img" not in chart and "&lt;img src=x onerror=alert(1)&gt;" in chart
    assert parse(chart).findtext("svg:title", namespaces=NS) == f"Daily requests and tokens for {HOSTILE}"
    page = jinja2.Environment(autoescape=True).from_string("<figure>{{ chart }}</figure>").render(chart=chart)
    assert page == f"<figure>{chart}</figure>"  # included as markup, no |safe needed


def test_ids_are_prefixed_and_referenced() -> None:
    charts = [parse(status_chart([], now=NOW, id_prefix="overview-chart")), parse(usage_chart([], project="p"))]
    ids = [element.get("id") for root in charts for element in root.iter() if element.get("id")]
    assert ids == ["overview-chart-title", "overview-chart-desc", "usage-title", "usage-desc"]
    for root, prefix in zip(charts, ("overview-chart", "usage"), strict=True):
        assert (root.get("aria-labelledby"), root.get("aria-describedby")) == (f"{prefix}-title", f"{prefix}-desc")


def test_nothing_the_csp_forbids_and_same_input_same_bytes() -> None:
    made = [status_chart([HourBucket(NOW, {"2xx": 5, "3xx": 1})], now=NOW),
            usage_chart([DayUsage(date(2024, 12, 1), 3, 70)], project=HOSTILE)]
    for chart in made:
        for element in parse(chart).iter():
            assert element.tag not in (f"{SVG}style", f"{SVG}script", f"{SVG}foreignObject")
            assert not [name for name in element.attrib if name == "style" or name.startswith("on")]
    assert made[0] == status_chart([HourBucket(NOW, {"2xx": 5, "3xx": 1})], now=NOW)


@pytest.mark.parametrize("make", [
    lambda: HourBucket(NOW, {"2xx": -1}),
    lambda: HourBucket(NOW, {"200": 1}),
    lambda: HourBucket(NOW, {"2xx": True}),
    lambda: HourBucket(NOW.replace(tzinfo=None), {}),
    lambda: DayUsage(date(2024, 12, 1), 1, -5),
    lambda: DayUsage(date(2024, 12, 1), 1.5, 0),  # type: ignore[arg-type]
    lambda: status_chart([], now=NOW.replace(tzinfo=None)),
    lambda: status_chart([], now=NOW, id_prefix='x" onload="alert(1)'),
    lambda: usage_chart([], project="p", id_prefix="1st"),
])
def test_bad_input_is_refused(make: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        make()


def within_viewbox(chart: Markup) -> None:
    assert "nan" not in chart.lower() and "inf" not in chart.lower()
    for element in parse(chart).iter():
        for name in ("x", "x1", "x2", "cx"):
            if name in element.attrib:
                assert 0 <= float(element.attrib[name]) <= WIDTH
        for name in ("y", "y1", "y2", "cy"):
            if name in element.attrib:
                assert 0 <= float(element.attrib[name]) <= HEIGHT
        if element.tag == f"{SVG}rect":
            assert float(element.attrib["height"]) >= 0
            assert float(element.attrib["x"]) + float(element.attrib["width"]) <= WIDTH
            assert float(element.attrib["y"]) + float(element.attrib["height"]) <= HEIGHT
        for point in element.get("points", "").split():
            x, y = map(float, point.split(","))
            assert 0 <= x <= WIDTH and 0 <= y <= HEIGHT


counts = st.integers(min_value=0, max_value=10**18)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(STATUS_CLASSES), counts), min_size=24, max_size=24))
def test_any_status_counts_draw_inside_the_viewbox(hours: list[dict[str, int]]) -> None:
    within_viewbox(status_chart([HourBucket(NOW - n * HOUR, c) for n, c in enumerate(hours)], now=NOW))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(counts, counts), max_size=120))
def test_any_usage_draws_inside_the_viewbox(days: list[tuple[int, int]]) -> None:
    within_viewbox(usage_chart([DayUsage(date(2024, 1, 1) + timedelta(days=n), r, t) for n, (r, t) in enumerate(days)],
                               project="p"))

"""Summarise a py-spy `--format raw` profile (collapsed stacks) into the functions that cost the most."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# py-spy frames read `function (path/to/file.py:123)`; the line number is dropped so a function is one entry.
_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
_ANCHORS = ("site-packages/", "lib/python3", "llm_proxy/", "bench/")


@dataclass(frozen=True)
class Profile:
    """Sample counts: where the CPU was (self) and what was on the stack (inclusive)."""
    samples: int
    own: Counter[str]
    inclusive: Counter[str]

    def top(self, kind: str, count: int, contains: str = "") -> list[tuple[str, float]]:
        """Return the `count` largest entries of `own` or `inclusive` as (frame, share of all samples)."""
        table = self.own if kind == "own" else self.inclusive
        rows = [(frame, hits / self.samples) for frame, hits in table.most_common() if contains in frame]
        return rows[:count]


def frame_name(raw: str) -> str:
    """Shorten `fn (/…/site-packages/aiohttp/web_protocol.py:512)` to `aiohttp/web_protocol.py:fn`."""
    match = _FRAME.match(raw.strip())
    if match is None:
        return raw.strip()
    path = match["file"]
    for anchor in _ANCHORS:
        where = path.rfind(anchor)
        if where >= 0:
            path = path[where:].removeprefix("site-packages/")
            break
    path = re.sub(r"^lib/python3\.\d+/", "", path)
    return f"{path}:{match['function']}"


def parse(text: str) -> Profile:
    """Read collapsed stacks, one `frame;frame;… count` a line."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    samples = 0
    for line in text.splitlines():
        stack, _, hits = line.rpartition(" ")
        if not stack or not hits.isdigit():
            continue
        count = int(hits)
        frames = [frame_name(frame) for frame in stack.split(";") if frame]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    return Profile(max(samples, 1), own, inclusive)


def report(path: Path, count: int = 15) -> str:
    """Render the top self-time and inclusive-time frames of one profile file."""
    profile = parse(path.read_text(errors="replace"))
    lines = [f"{path.name}: {profile.samples} samples of the thread holding the GIL",
             "  self time (where the CPU was):"]
    lines += [f"    {share:6.1%}  {frame}" for frame, share in profile.top("own", count)]
    lines.append("  inclusive time, llm_proxy frames:")
    lines += [f"    {share:6.1%}  {frame}" for frame, share in profile.top("inclusive", count, "llm_proxy/")]
    return "\n".join(lines)

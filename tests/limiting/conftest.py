"""Fixtures of the limiter unit tests: a settable clock, so no test sleeps to let time pass."""

from __future__ import annotations

import pytest

from tests.fakes import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)

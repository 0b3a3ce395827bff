"""The cap on requests in flight (ConcurrencyLimiter): admit up to the cap, refuse the rest, never queue."""

from __future__ import annotations

import pytest

from llm_proxy.limiting.memory import ConcurrencyLimiter


def test_admits_up_to_the_cap_then_refuses_without_queueing() -> None:
    admission = ConcurrencyLimiter(3)
    assert [admission.try_acquire() for _ in range(5)] == [True, True, True, False, False]
    assert admission.in_flight == 3
    admission.release()
    assert admission.in_flight == 2
    assert admission.try_acquire()
    assert not admission.try_acquire()
    assert admission.limit == 3


def test_releasing_everything_returns_to_zero() -> None:
    admission = ConcurrencyLimiter(2)
    for _ in range(100):
        assert admission.try_acquire() and admission.try_acquire()
        admission.release()
        admission.release()
    assert admission.in_flight == 0


def test_unmatched_release_is_an_error() -> None:
    admission = ConcurrencyLimiter(1)
    with pytest.raises(RuntimeError):
        admission.release()
    assert admission.try_acquire()
    admission.release()
    with pytest.raises(RuntimeError):
        admission.release()
    assert admission.in_flight == 0


def test_concurrency_zero_is_uncapped() -> None:
    admission = ConcurrencyLimiter(0)
    assert all(admission.try_acquire() for _ in range(10_000))
    assert admission.in_flight == 10_000


def test_concurrency_limit_rejects_negative() -> None:
    with pytest.raises(ValueError, match="limit"):
        ConcurrencyLimiter(-1)

"""Anomaly detection and token expiry housekeeping, with an injected clock and synthetic traffic."""

from __future__ import annotations

import sqlite3
from typing import Any

import orjson

from llm_proxy.app import ANOMALIES, AUDIT, EXPIRY_JOB
from tests.fakes import FakeClock, Gateway


async def _events(gateway: Gateway, action: str) -> list[dict[str, Any]]:
    await gateway.app[AUDIT].flush()
    path = gateway.settings.audit_log_file
    assert path is not None
    return [e for e in map(orjson.loads, path.read_bytes().splitlines()) if e["action"] == action]


async def _call(gateway: Gateway, token: str, ip: str = "203.0.113.1") -> int:
    response = await gateway.client.get("/v1/models", headers={"Authorization": f"Bearer {token}",
                                                               "X-Forwarded-For": ip})
    await response.read()
    return response.status


async def test_too_many_client_ips_flags_the_token_once(make_gateway: Any) -> None:
    gateway = await make_gateway(TRUSTED_PROXIES="127.0.0.1/32", ANOMALY_MAX_IPS_PER_HOUR="3")
    token = await gateway.token()

    for n in range(3):
        assert await _call(gateway, token["token"], f"198.51.100.{n}") == 200
    assert await _events(gateway, "token.anomaly") == []
    for n in range(3, 6):
        assert await _call(gateway, token["token"], f"198.51.100.{n}") == 200  # not suspended by default

    flagged = await _events(gateway, "token.anomaly")
    assert len(flagged) == 1
    assert flagged[0]["actor"] == "system" and flagged[0]["project_id"] == token["project_id"]
    assert flagged[0]["details"]["reason"] == "too_many_ips" and flagged[0]["details"]["distinct_ips"] == 4
    assert flagged[0]["details"]["token_id"] == token["token_hint"]


async def test_auto_suspend_deactivates_a_flagged_token_at_once(make_gateway: Any) -> None:
    gateway = await make_gateway(TRUSTED_PROXIES="127.0.0.1/32", ANOMALY_MAX_IPS_PER_HOUR="2",
                                 ANOMALY_AUTO_SUSPEND="true")
    token = await gateway.token()

    statuses = [await _call(gateway, token["token"], f"198.51.100.{n}") for n in range(4)]
    await gateway.app[ANOMALIES].close()  # let the suspension reach the database

    assert statuses == [200, 200, 200, 401]
    assert (await gateway.manage("GET", f"/tokens/{token['id']}", expect=200))["is_active"] is False
    suspended = await _events(gateway, "token.suspend")
    assert [(e["result"], e["details"]["reason"]) for e in suspended] == [("success", "too_many_ips")]
    assert (await _events(gateway, "token.anomaly"))[0]["details"]["auto_suspend"] is True


async def test_rate_spike_over_the_trailing_hour_average(make_gateway: Any) -> None:
    clock = FakeClock()
    gateway = await make_gateway(clock=clock, ANOMALY_RATE_FACTOR="5", RATE_LIMIT_PER_MINUTE="0")
    token = await gateway.token(duration_minutes=600)

    for _ in range(13):  # a quiet hour: two requests every five minutes
        for _ in range(2):
            assert await _call(gateway, token["token"]) == 200
        clock.now += 300
    for _ in range(5):  # five in a minute is not more than 5 × max(average, 1)
        assert await _call(gateway, token["token"]) == 200
    assert await _events(gateway, "token.anomaly") == []

    assert await _call(gateway, token["token"]) == 200  # the sixth in that minute is

    flagged = await _events(gateway, "token.anomaly")
    assert [e["details"]["reason"] for e in flagged] == ["rate_spike"]
    assert flagged[0]["details"]["requests_last_minute"] == 6


async def test_a_new_token_needs_an_hour_of_history_before_spikes_count(make_gateway: Any) -> None:
    gateway = await make_gateway(clock=FakeClock(), ANOMALY_RATE_FACTOR="2", RATE_LIMIT_PER_MINUTE="0")
    token = await gateway.token()
    for _ in range(20):
        assert await _call(gateway, token["token"]) == 200
    assert await _events(gateway, "token.anomaly") == []


async def test_replaying_a_revoked_token_is_flagged(gateway: Gateway) -> None:
    token = await gateway.token()
    await gateway.manage("DELETE", f"/tokens/{token['id']}", expect=204)

    statuses = [await _call(gateway, token["token"]) for _ in range(3)]

    assert statuses == [401, 401, 401]
    flagged = await _events(gateway, "token.anomaly")
    assert [(e["details"]["reason"], e["details"]["token_state"]) for e in flagged] == [
        ("dead_token_replay", "token_revoked")]


async def test_a_replay_flag_carries_the_client_ip_masked_when_masking_is_on(make_gateway: Any) -> None:
    gateway = await make_gateway(TRUSTED_PROXIES="127.0.0.1/32", AUDIT_MASK_CLIENT_IP="true", IP_RATE_LIMIT="0")
    token = await gateway.token()
    await gateway.manage("DELETE", f"/tokens/{token['id']}", expect=204)

    assert [await _call(gateway, token["token"], ip="203.0.113.77") for _ in range(3)] == [401, 401, 401]

    (flagged,) = await _events(gateway, "token.anomaly")
    assert flagged["details"]["reason"] == "dead_token_replay"
    assert flagged["client_ip"] == "203.0.113.0" and "client_ip" not in flagged["details"]
    path = gateway.settings.audit_log_file
    assert path is not None
    with sqlite3.connect(gateway.settings.database_path) as conn:
        rows = conn.execute("SELECT client_ip, details FROM audit_events").fetchall()
    assert "203.0.113.77" not in repr(rows) and b"203.0.113.77" not in path.read_bytes()


async def test_expiry_job_deactivates_expired_tokens_and_audits_them(make_gateway: Any) -> None:
    clock = FakeClock()
    gateway = await make_gateway(clock=clock)
    short, long = await gateway.token(duration_minutes=1), await gateway.token(duration_minutes=60)
    job = gateway.app[EXPIRY_JOB]

    assert await job.run_once() == 0
    clock.now += 61
    assert await job.run_once() == 1
    assert await job.run_once() == 0

    expired = await _events(gateway, "token.expire")
    assert [(e["actor"], e["result"], e["details"]["token_id"]) for e in expired] == [
        ("system", "success", short["token_hint"])]
    assert (await gateway.manage("GET", f"/tokens/{short['id']}", expect=200))["is_active"] is False
    response = await gateway.client.get("/v1/models", headers={"Authorization": f"Bearer {short['token']}"})
    assert (await response.json())["error"]["code"] == "token_expired"
    listed_expired = await gateway.manage("GET", "/tokens?expired=true", expect=200)
    listed_live = await gateway.manage("GET", "/tokens?expired=false", expect=200)
    assert [t["id"] for t in listed_expired["data"]] == [short["id"]]
    assert [t["id"] for t in listed_live["data"]] == [long["id"]]


async def test_a_burst_straddling_a_minute_boundary_is_a_spike(make_gateway: Any) -> None:
    """The rate is over the last 60 seconds, not the calendar minute."""
    clock = FakeClock(1_800_000_000.0)  # a whole minute
    gateway = await make_gateway(clock=clock, ANOMALY_RATE_FACTOR="5", RATE_LIMIT_PER_MINUTE="0")
    token = await gateway.token(duration_minutes=600)
    for _ in range(13):  # a quiet hour
        assert await _call(gateway, token["token"]) == 200
        clock.advance(300)
    quiet_end = clock.now
    for _ in range(5):
        assert await _call(gateway, token["token"]) == 200
    clock.advance(60)  # those five are now more than a minute old
    for _ in range(5):
        assert await _call(gateway, token["token"]) == 200
    assert await _events(gateway, "token.anomaly") == []

    clock.now = quiet_end + 179.0  # one second before a minute boundary
    for _ in range(3):
        assert await _call(gateway, token["token"]) == 200
    clock.advance(1.5)
    for _ in range(3):
        assert await _call(gateway, token["token"]) == 200

    flagged = await _events(gateway, "token.anomaly")
    assert [(e["details"]["reason"], e["details"]["requests_last_minute"]) for e in flagged] == [("rate_spike", 6)]


async def test_rate_spike_sliding_window_counts_burst_across_history_mark(make_gateway: Any) -> None:
    """From the review of the day's fixes."""
    clock = FakeClock()
    gateway = await make_gateway(clock=clock, RATE_LIMIT_PER_MINUTE="0", ANOMALY_RATE_FACTOR="10",
                                 IP_RATE_LIMIT="100000")
    token = (await gateway.token(duration_minutes=600))["token"]
    headers = {"Authorization": f"Bearer {token}"}
    clock.advance(5)  # minute-aligned start + 5 s
    assert (await gateway.client.get("/v1/models", headers=headers)).status == 200  # first seen
    clock.advance(3590)  # 10 s before the token has an hour of history, 5 s before a minute ends
    for _ in range(200):
        assert (await gateway.client.get("/v1/models", headers=headers)).status == 200
    clock.advance(10)  # an hour of history now; the burst is 10 s old, inside the last 60 s
    for _ in range(5):
        assert (await gateway.client.get("/v1/models", headers=headers)).status == 200
    # 205 requests in the last 60 s, against ~3.4/min (or 1/60 per minute before the burst): a spike
    events = await _events(gateway, action="token.anomaly")
    reasons = [event["details"]["reason"] for event in events]
    assert "rate_spike" in reasons, reasons


async def test_auto_suspend_leaves_an_expired_token_alone(make_gateway: Any) -> None:
    """Only a live token is suspended: replaying an expired one is flagged, and nothing more."""
    clock = FakeClock()
    gateway = await make_gateway(clock=clock, ANOMALY_AUTO_SUSPEND="true")
    token = await gateway.token(duration_minutes=1)
    clock.advance(120)

    assert [await _call(gateway, token["token"]) for _ in range(3)] == [401, 401, 401]
    await gateway.app[ANOMALIES].close()  # a suspension, had there been one, has reached the database

    flagged = await _events(gateway, "token.anomaly")
    assert [(e["result"], e["details"]["reason"], e["details"]["token_state"], e["details"]["auto_suspend"])
            for e in flagged] == [("success", "dead_token_replay", "token_expired", False)]
    assert await _events(gateway, "token.suspend") == []


async def test_retrying_a_paused_token_is_not_a_replay_until_it_is_revoked(gateway: Gateway) -> None:
    """A token paused with is_active=false is neither revoked nor expired; once revoked, replays count."""
    token = await gateway.token()
    await gateway.manage("PATCH", f"/tokens/{token['id']}", {"is_active": False}, expect=200)

    assert [await _call(gateway, token["token"]) for _ in range(4)] == [401] * 4
    assert await _events(gateway, "token.anomaly") == []

    await gateway.manage("DELETE", f"/tokens/{token['id']}", expect=204)
    assert [await _call(gateway, token["token"]) for _ in range(2)] == [401, 401]
    assert await _events(gateway, "token.anomaly") == []  # the paused attempts did not count
    assert await _call(gateway, token["token"]) == 401
    flagged = await _events(gateway, "token.anomaly")
    assert [(e["details"]["reason"], e["details"]["token_state"], e["details"]["attempts_last_hour"])
            for e in flagged] == [("dead_token_replay", "token_revoked", 3)]

"""The failed-authentication guard: per client IP, shared through Redis, blocking after the limit."""

from __future__ import annotations

import ipaddress
from typing import Any

import redis.asyncio as aioredis

from service.errors import RateLimited
from service.ratelimit import IpAuthFailureGuard, LocalRateLimiter, RedisRateLimiter
from service.settings import RateLimitPolicy
from tests.ratelimit.conftest import ManualClock

POLICY = RateLimitPolicy("ip-auth-failure", 3, 60, 3)
PROXY = (ipaddress.ip_network("10.0.0.0/8"),)


def scope(peer: str, xff: str | None = None) -> dict[str, Any]:
    """Build an ASGI scope from a peer and an optional X-Forwarded-For."""
    headers = [(b"x-forwarded-for", xff.encode())] if xff else []
    return {"type": "http", "client": (peer, 4000), "headers": headers}


async def test_guard_blocks_an_ip_after_the_limit(aredis: aioredis.Redis) -> None:
    clock = ManualClock()
    guard = IpAuthFailureGuard(RedisRateLimiter(aredis), POLICY, PROXY, clock)
    attacker = scope("203.0.113.9")
    for _ in range(3):
        assert await guard.check(attacker) is None
        assert await guard.record(attacker) is None
    blocked = await guard.record(attacker)
    assert isinstance(blocked, RateLimited) and blocked.status == 429
    assert blocked.headers["Retry-After"] == "20" and "RateLimit" in blocked.headers
    assert blocked.extra == {"policy": "ip-auth-failure"}

    refused = await guard.check(attacker)
    assert isinstance(refused, RateLimited) and refused.retry_after == 20
    assert await guard.check(scope("198.51.100.1")) is None  # other addresses are unaffected
    assert await aredis.exists("rl:{ip:203.0.113.9}:ip-auth-failure") == 1

    clock.advance(19)
    refused = await guard.check(attacker)
    assert isinstance(refused, RateLimited) and refused.retry_after == 1
    clock.advance(1)
    assert await guard.check(attacker) is None


async def test_guard_counts_the_forwarded_client_not_the_proxy() -> None:
    clock = ManualClock()
    guard = IpAuthFailureGuard(LocalRateLimiter(clock), POLICY, PROXY, clock)
    for _ in range(3):
        assert await guard.record(scope("10.0.0.1", "198.51.100.7")) is None
    assert isinstance(await guard.record(scope("10.0.0.1", "198.51.100.7")), RateLimited)
    assert isinstance(await guard.check(scope("10.0.0.2", "6.6.6.6, 198.51.100.7")), RateLimited)
    # Another client behind the same proxy is not blocked, and a spoofed header from outside is ignored.
    assert await guard.check(scope("10.0.0.1", "198.51.100.8")) is None
    assert await guard.check(scope("203.0.113.50", "198.51.100.7")) is None


async def test_guard_shares_counts_across_processes_through_redis(aredis: aioredis.Redis) -> None:
    clock = ManualClock()
    first = IpAuthFailureGuard(RedisRateLimiter(aredis), POLICY, (), clock)
    second = IpAuthFailureGuard(RedisRateLimiter(aredis), POLICY, (), clock)
    ip = scope("203.0.113.77")
    assert await first.record(ip) is None
    assert await second.record(ip) is None
    assert await first.record(ip) is None
    assert isinstance(await second.record(ip), RateLimited)
    assert await first.check(ip) is None  # blocks are remembered by the guard that saw the rejection
    assert isinstance(await second.check(ip), RateLimited)


async def test_shadow_policy_never_blocks() -> None:
    clock = ManualClock()
    shadow = RateLimitPolicy("ip-auth-failure", 1, 60, 1, shadow=True)
    guard = IpAuthFailureGuard(LocalRateLimiter(clock), shadow, (), clock)
    for _ in range(5):
        assert await guard.record(scope("203.0.113.9")) is None
    assert await guard.check(scope("203.0.113.9")) is None


async def test_blocked_memory_is_bounded() -> None:
    clock = ManualClock()
    one = RateLimitPolicy("ip-auth-failure", 1, 60, 1)
    guard = IpAuthFailureGuard(LocalRateLimiter(clock), one, (), clock, max_blocked=5)
    for index in range(20):
        ip = scope(f"198.51.100.{index}")
        await guard.record(ip)
        assert isinstance(await guard.record(ip), RateLimited)
    blocked = [await guard.check(scope(f"198.51.100.{index}")) for index in range(20)]
    assert [b is not None for b in blocked] == [False] * 15 + [True] * 5

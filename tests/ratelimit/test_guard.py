"""The failed-authentication guard: per client IP, shared through Redis, blocking after the limit."""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from service.dev_tokens import mint_token
from service.errors import RateLimited
from service.ratelimit import (
    CircuitBreaker,
    Hit,
    IpAuthFailureGuard,
    LocalRateLimiter,
    RedisRateLimiter,
    ResilientRateLimiter,
)
from service.redis_client import close_redis, create_redis
from service.settings import DEFAULT_RATE_LIMITS, RateLimitPolicy, RedisErrorMode, RedisTopology
from tests.observability.test_metrics import value
from tests.ratelimit.conftest import ManualClock
from tests.support.gateway import Gateway
from tests.support.servers import RedisServer

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


# An IPv6 client is handed at least a /64 and picks any address in it, so counting per address never limits it.
V6_NET = "2001:db8:aa:bb"


async def test_ipv6_failures_count_per_64_whatever_address_the_client_rotates_to(
    aredis: aioredis.Redis,
) -> None:
    clock = ManualClock()
    guard = IpAuthFailureGuard(RedisRateLimiter(aredis), POLICY, (), clock)
    for host in range(1, 4):
        assert await guard.record(scope(f"{V6_NET}::{host:x}")) is None
    blocked = await guard.record(scope(f"{V6_NET}:1234:5678:9abc:def0"))
    assert isinstance(blocked, RateLimited) and blocked.status == 429
    # Every address of that /64 is refused before it can try again; the neighbouring /64 is not.
    assert isinstance(await guard.check(scope(f"{V6_NET}:ffff:ffff:ffff:ffff")), RateLimited)
    assert isinstance(await guard.check(scope(f"[{V6_NET}::77]:443")), RateLimited)
    assert await guard.check(scope("2001:db8:aa:bc::1")) is None
    assert await aredis.keys("rl:*") == [f"rl:{{ip:{V6_NET}::/64}}:ip-auth-failure"]


async def test_ipv6_prefix_length_is_configurable() -> None:
    clock = ManualClock()
    per_48 = IpAuthFailureGuard(LocalRateLimiter(clock), POLICY, (), clock, ipv6_prefix=48)
    for net in ("2001:db8:aa:1::1", "2001:db8:aa:2::1", "2001:db8:aa:3::1"):
        assert await per_48.record(scope(net)) is None
    assert isinstance(await per_48.record(scope("2001:db8:aa:4::1")), RateLimited)
    assert await per_48.check(scope("2001:db8:ab::1")) is None

    per_address = IpAuthFailureGuard(LocalRateLimiter(clock), POLICY, (), clock, ipv6_prefix=128)
    for host in range(1, 10):
        assert await per_address.record(scope(f"{V6_NET}::{host}")) is None


async def test_ipv4_counts_per_address_and_ipv4_mapped_ipv6_as_ipv4() -> None:
    clock = ManualClock()
    guard = IpAuthFailureGuard(LocalRateLimiter(clock), POLICY, PROXY, clock)
    assert await guard.record(scope("203.0.113.9")) is None
    assert await guard.record(scope("::ffff:203.0.113.9")) is None
    assert await guard.record(scope("10.0.0.1", "::ffff:203.0.113.9")) is None
    assert isinstance(await guard.record(scope("203.0.113.9")), RateLimited)
    # IPv4 is not aggregated: the neighbour in the same /24 (or /31) is another client.
    assert await guard.check(scope("203.0.113.8")) is None
    assert isinstance(await guard.check(scope("::ffff:203.0.113.9")), RateLimited)


def test_an_ipv6_prefix_outside_32_to_128_is_refused() -> None:
    with pytest.raises(ValueError, match="ipv6_prefix"):
        IpAuthFailureGuard(LocalRateLimiter(), POLICY, (), ipv6_prefix=31)


async def test_gateway_limits_an_ipv6_client_rotating_through_its_64(
    make_gateway: Callable[..., contextlib.AbstractAsyncContextManager[Gateway]], tmp_path: Path
) -> None:
    # Real JWTs through the whole app and the private Redis; the client IP arrives through a trusted proxy.
    config = tmp_path / "gateway.toml"
    config.write_text("[rate_limits.ip-auth-failure]\nlimit = 3\nperiod_seconds = 60\nburst = 3\n")
    async with make_gateway(GATEWAY_CONFIG=str(config), TRUSTED_PROXIES="203.0.113.7/32") as gw:
        forged = mint_token("another-secret-0123456789abcdef0123456789ab", "mallory")

        async def call(client: str, token: str) -> int:
            response = await gw.client.get(
                "/v1/convai/conversations",
                headers={"Authorization": f"Bearer {token}", "X-Forwarded-For": client},
            )
            return response.status_code

        # Each failure from a fresh address of the same /64.
        assert [await call(f"{V6_NET}::{host:x}", forged) for host in range(1, 5)] == [401, 401, 401, 429]
        valid = gw.token("mallory")
        assert await call(f"{V6_NET}:dead:beef:0:1", valid) == 429
        assert await call("2001:db8:aa:bc::1", valid) == 200


# --- Redis down with RATE_LIMIT_ON_REDIS_ERROR=closed or open ----------------------------------------------
# The limiter answers 503 (closed) or allows without counting (open), so uncounted failures would let a client
# test tokens it holds (expired, revoked, valid: 401, or 503 / 200) without limit for the whole outage.


@pytest.mark.parametrize(
    ("mode", "policy", "retry_after"),
    [("closed", POLICY, 20), ("open", DEFAULT_RATE_LIMITS["ip-auth-failure"], 1)],  # open: the default 60/min
)
async def test_failures_are_counted_in_process_while_the_limiter_has_no_redis(
    mode: RedisErrorMode, policy: RateLimitPolicy, retry_after: int, redis_url: str, redis_server: RedisServer
) -> None:
    clock = ManualClock()
    redis = create_redis(RedisTopology(url=redis_url), timeout=0.1)
    limiter = ResilientRateLimiter(
        RedisRateLimiter(redis), LocalRateLimiter(clock), mode=mode, breaker=CircuitBreaker(clock=clock)
    )
    guard = IpAuthFailureGuard(limiter, policy, (), clock)
    attacker = scope("203.0.113.9")
    try:
        redis_server.stop()
        for _ in range(policy.burst):
            assert await guard.check(attacker) is None
            assert await guard.record(attacker) is None
        blocked = await guard.record(attacker)
        assert isinstance(blocked, RateLimited) and blocked.retry_after == retry_after
        assert isinstance(await guard.check(attacker), RateLimited)
        assert await guard.check(scope("198.51.100.1")) is None
    finally:
        await close_redis(redis)


async def test_an_open_limiter_without_redis_still_allows_every_other_request_uncounted(
    redis_url: str, redis_server: RedisServer
) -> None:
    clock = ManualClock()
    redis = create_redis(RedisTopology(url=redis_url), timeout=0.1)
    limiter = ResilientRateLimiter(
        RedisRateLimiter(redis), LocalRateLimiter(clock), mode="open", breaker=CircuitBreaker(clock=clock)
    )
    guard = IpAuthFailureGuard(limiter, DEFAULT_RATE_LIMITS["ip-auth-failure"], (), clock)
    session = Hit(DEFAULT_RATE_LIMITS["user-session"], "user:mallory")
    try:
        redis_server.stop()
        for _ in range(61):  # the address is blocked by now
            await guard.record(scope("203.0.113.9"))
        # Every other request is still allowed and not counted, as `open` mode promises (user-session: 5 burst).
        for _ in range(10):
            decision = await limiter.acquire([session])
            assert decision.allowed and decision.headers() == {}
    finally:
        await close_redis(redis)


# closed: every request gets 503; open: allowed, uncounted. Failed authentications are counted in both.
@pytest.mark.parametrize(
    ("mode", "valid_answer"), [("closed", (503, "rate_limiter_unavailable")), ("open", (200, None))]
)
async def test_gateway_limits_failed_authentications_while_redis_is_down(
    mode: RedisErrorMode,
    valid_answer: tuple[int, str | None],
    make_gateway: Callable[..., contextlib.AbstractAsyncContextManager[Gateway]],
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[rate_limits.ip-auth-failure]\nlimit = 3\nperiod_seconds = 60\nburst = 3\n")
    env = {"GATEWAY_CONFIG": str(config), "RATE_LIMIT_ON_REDIS_ERROR": mode}
    async with make_gateway(**env) as gw:
        forged = mint_token("another-secret-0123456789abcdef0123456789ab", "mallory")

        async def call(token: str) -> tuple[int, str | None]:
            response = await gw.client.get(
                "/v1/convai/conversations", headers={"Authorization": f"Bearer {token}"}
            )
            return response.status_code, response.json().get("code")

        redis_server.stop()
        valid = gw.token("mallory")
        assert await call(valid) == valid_answer
        assert [(await call(forged))[0] for _ in range(4)] == [401, 401, 401, 429]
        assert (await call(valid))[0] == 429  # the address is blocked: no more telling valid from invalid
        # The in-process 429 reaches the rate-limit metric like the limiter's own fallback decisions.
        body = (await gw.client.get("/metrics")).content
        name = "convai_gateway_rate_limit_decisions_total"
        assert value(body, name, policy="ip-auth-failure", outcome="limited") == 1
        assert value(body, name, policy="ip-auth-failure", outcome="allowed") == 2


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_guard_observes_its_in_process_decisions_and_not_the_shared_ones(
    mode: RedisErrorMode, redis_url: str, redis_server: RedisServer
) -> None:
    clock = ManualClock()
    outcomes: list[tuple[str, str]] = []

    def observe(name: str, outcome: str) -> None:
        outcomes.append((name, outcome))

    redis = create_redis(RedisTopology(url=redis_url), timeout=0.1)
    limiter = ResilientRateLimiter(
        RedisRateLimiter(redis),
        LocalRateLimiter(clock),
        mode=mode,
        breaker=CircuitBreaker(clock=clock),
        observe=observe,
    )
    guard = IpAuthFailureGuard(limiter, POLICY, (), clock, observe=observe)
    attacker = scope("203.0.113.9")
    try:
        assert await guard.record(attacker) is None  # counted in Redis: the shared limiter observes it
        assert outcomes == [("ip-auth-failure", "allowed")]
        redis_server.stop()
        assert await guard.record(attacker) is None  # in process from here on (fresh state)
        assert await guard.record(attacker) is None
        assert await guard.record(attacker) is None
        assert isinstance(await guard.record(attacker), RateLimited)
        assert outcomes == [
            ("ip-auth-failure", o) for o in ("allowed", "allowed", "allowed", "near_limit", "limited")
        ]
    finally:
        await close_redis(redis)

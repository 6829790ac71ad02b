"""GCRA semantics, identical for the Redis script and the in-process limiter (parametrized over both)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis
from http_sfv.list import List as SfList

from service.errors import RateLimited
from service.ratelimit import (
    Decision,
    Hit,
    LocalRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    enforce,
    state_key,
)
from service.settings import RateLimitPolicy, Secret, Settings
from tests.ratelimit.conftest import ManualClock, policy
from tests.support.gateway import Gateway
from tests.support.servers import RedisServer

AGENT = {"agent_id": "agent_demo"}

Factory = Callable[..., RateLimiter]


@pytest.fixture(params=["redis", "local"])
async def make_limiter(
    request: pytest.FixtureRequest, redis_url: str, clock: ManualClock
) -> AsyncIterator[Factory]:
    """Return a factory of limiters of one kind, all on the same manual clock."""
    clients: list[aioredis.Redis] = []

    def factory(observe: Callable[[str, str], None] | None = None) -> RateLimiter:
        if request.param == "local":
            return LocalRateLimiter(clock, observe=observe)
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        clients.append(client)
        return RedisRateLimiter(client, clock=clock, observe=observe)

    try:
        yield factory
    finally:
        for client in clients:
            await client.aclose()


def summary(decision: Decision) -> list[tuple[bool, int, float, float]]:
    """Return (allowed, remaining, reset_after, retry_after) per policy, times rounded to the microsecond."""
    return [
        (r.allowed, r.remaining, round(r.reset_after, 6), round(r.retry_after, 6)) for r in decision.results
    ]


async def test_burst_is_admitted_at_once_then_one_per_interval(
    make_limiter: Factory, clock: ManualClock
) -> None:
    limiter = make_limiter()
    hit = Hit(policy(limit=10, period=60, burst=5), "user:alice")  # T = 6 s
    admitted = [summary(await limiter.acquire([hit]))[0] for _ in range(5)]
    assert admitted == [(True, 4 - i, 6.0 * (i + 1), 0.0) for i in range(5)]

    rejected = await limiter.acquire([hit])
    assert not rejected.allowed
    assert summary(rejected) == [(False, 0, 30.0, 6.0)]
    assert rejected.retry_after == 6

    clock.advance(5.9)
    assert not (await limiter.acquire([hit])).allowed
    clock.advance(0.1)
    assert summary(await limiter.acquire([hit])) == [(True, 0, 30.0, 0.0)]
    assert not (await limiter.acquire([hit])).allowed

    clock.advance(30)  # fully refilled: the whole burst again, never more
    results = [(await limiter.acquire([hit])).allowed for _ in range(7)]
    assert results == [True] * 5 + [False] * 2


async def test_steady_rate_matches_the_limit_over_a_period(make_limiter: Factory, clock: ManualClock) -> None:
    limiter = make_limiter()
    hit = Hit(policy(limit=10, period=60, burst=1), "user:steady")
    admitted = 0
    for _ in range(600):  # one attempt per second for 10 minutes
        admitted += (await limiter.acquire([hit])).allowed
        clock.advance(1)
    assert admitted == 100


async def test_fractional_interval_admits_exactly_the_limit(
    make_limiter: Factory, clock: ManualClock
) -> None:
    limiter = make_limiter()
    hit = Hit(policy(limit=7, period=1, burst=7), "user:frac")  # T = 1/7 s, not representable exactly
    assert [(await limiter.acquire([hit])).allowed for _ in range(8)] == [True] * 7 + [False]
    clock.advance(1 / 7)
    assert [(await limiter.acquire([hit])).allowed for _ in range(2)] == [True, False]


async def test_subjects_and_policies_are_independent(make_limiter: Factory) -> None:
    limiter = make_limiter()
    tight = policy(burst=1)
    assert (await limiter.acquire([Hit(tight, "user:a")])).allowed
    assert not (await limiter.acquire([Hit(tight, "user:a")])).allowed
    assert (await limiter.acquire([Hit(tight, "user:b")])).allowed
    assert (await limiter.acquire([Hit(policy("user-history", burst=1), "user:a")])).allowed


async def test_all_or_nothing_leaves_the_other_policy_unchanged(make_limiter: Factory) -> None:
    limiter = make_limiter()
    user = Hit(policy("user-session", burst=3), "user:alice")
    agent = Hit(policy("agent-session", burst=1), "agent:agent_x")
    first = await limiter.acquire([user, agent])
    assert first.allowed and [r.remaining for r in first.results] == [2, 0]

    second = await limiter.acquire([user, agent])
    assert not second.allowed
    assert [r.allowed for r in second.results] == [True, False]  # the user policy alone would admit it

    # Had the rejected request consumed the user budget, only one would be left now.
    assert [r.remaining for r in (await limiter.acquire([user])).results] == [1]
    assert [r.remaining for r in (await limiter.acquire([user])).results] == [0]


async def test_all_or_nothing_keeps_redis_keys_byte_identical(
    aredis: aioredis.Redis, clock: ManualClock
) -> None:
    limiter = RedisRateLimiter(aredis, clock=clock)
    user = Hit(policy("user-session", burst=3), "user:alice")
    agent = Hit(policy("agent-session", burst=1), "agent:agent_x")
    assert (await limiter.acquire([user, agent])).allowed
    keys = [state_key(user), state_key(agent)]
    assert keys == ["rl:{user:alice}:user-session", "rl:{agent:agent_x}:agent-session"]
    before = await aredis.mget(keys)
    assert all(value is not None for value in before)

    clock.advance(1)
    for _ in range(3):
        assert not (await limiter.acquire([user, agent])).allowed
    assert await aredis.mget(keys) == before


async def test_rejection_leaves_redis_state_unchanged(aredis: aioredis.Redis, clock: ManualClock) -> None:
    limiter = RedisRateLimiter(aredis, clock=clock)
    hit = Hit(policy(burst=2), "user:bob")
    for _ in range(2):
        assert (await limiter.acquire([hit])).allowed
    before = await aredis.get(state_key(hit))
    for _ in range(5):
        clock.advance(0.5)
        assert not (await limiter.acquire([hit])).allowed
    assert await aredis.get(state_key(hit)) == before
    clock.advance(6 - 2.5)  # one interval after the last admission: admitted, so nothing was added
    assert (await limiter.acquire([hit])).allowed


async def test_redis_keys_expire_when_state_is_fresh_again(
    aredis: aioredis.Redis, clock: ManualClock
) -> None:
    limiter = RedisRateLimiter(aredis, clock=clock)
    hit = Hit(policy(limit=10, period=60, burst=5), "user:ttl")
    for _ in range(3):
        await limiter.acquire([hit])
    ttl_ms = await aredis.pttl(state_key(hit))
    assert 17_000 < ttl_ms <= 18_000  # 3 * T = 18 s: after that the key equals "no key"


async def test_redis_time_is_the_default_clock(aredis: aioredis.Redis) -> None:
    limiter = RedisRateLimiter(aredis)
    hit = Hit(policy(limit=2, period=3600, burst=2), "user:wall")
    decisions = [await limiter.acquire([hit]) for _ in range(3)]
    assert [d.allowed for d in decisions] == [True, True, False]
    assert 1799 < decisions[2].results[0].retry_after <= 1800
    assert decisions[2].retry_after == 1800


async def test_shadow_policy_counts_but_never_blocks(make_limiter: Factory) -> None:
    seen: list[tuple[str, str]] = []
    limiter = make_limiter(observe=lambda name, outcome: seen.append((name, outcome)))
    shadow = Hit(policy("user-history", burst=2, shadow=True), "user:s")
    enforced = Hit(policy("user-session", limit=100, burst=100), "user:s")
    decisions = [await limiter.acquire([shadow, enforced]) for _ in range(4)]
    assert all(d.allowed for d in decisions)
    assert [d.results[0].allowed for d in decisions] == [True, True, False, False]
    assert [d.results[1].remaining for d in decisions] == [99, 98, 97, 96]  # enforced one still counts
    assert [o for n, o in seen if n == "user-history"] == [
        "allowed",
        "near_limit",
        "shadow_limited",
        "shadow_limited",
    ]
    assert "user-history" not in decisions[3].headers().get("RateLimit", "")
    assert "Retry-After" not in decisions[3].headers()


async def test_observe_reports_one_outcome_per_policy(make_limiter: Factory) -> None:
    seen: list[tuple[str, str]] = []
    limiter = make_limiter(observe=lambda name, outcome: seen.append((name, outcome)))
    hit = Hit(policy(limit=20, period=60, burst=20), "user:o")
    for _ in range(21):
        await limiter.acquire([hit])
    outcomes = [o for _, o in seen]
    # remaining <= 10% of burst (2) counts as near_limit.
    assert outcomes == ["allowed"] * 17 + ["near_limit"] * 3 + ["limited"]


def parse_list(value: str) -> list[tuple[str, dict[str, object]]]:
    """Parse a structured-field List header into (item, params) pairs."""
    parsed = SfList()
    parsed.parse(value.encode())
    return [(item.value, dict(item.params)) for item in parsed]


async def test_headers_are_structured_fields(make_limiter: Factory, clock: ManualClock) -> None:
    limiter = make_limiter()
    user = Hit(policy("user-session", limit=10, period=60, burst=5), "user:h")
    agent = Hit(policy("agent-session", limit=600, period=60, burst=600), "agent:h")
    decision = await limiter.acquire([user, agent])
    headers = decision.headers()
    assert parse_list(headers["RateLimit-Policy"]) == [
        ("user-session", {"q": 10, "w": 60}),
        ("agent-session", {"q": 600, "w": 60}),
    ]
    assert parse_list(headers["RateLimit"]) == [
        ("user-session", {"r": 4, "t": 6}),
        ("agent-session", {"r": 599, "t": 1}),
    ]
    assert "Retry-After" not in headers

    for _ in range(4):
        await limiter.acquire([user])
    clock.advance(0.5)
    rejected = (await limiter.acquire([user, agent])).headers()
    assert rejected["Retry-After"] == "6"  # 5.5 s rounded up
    assert parse_list(rejected["RateLimit"])[0] == ("user-session", {"r": 0, "t": 30})


async def test_enforce_raises_rate_limited_with_every_header(make_limiter: Factory) -> None:
    limits = {
        "user-session": RateLimitPolicy("user-session", 10, 60, 2),
        "agent-session": RateLimitPolicy("agent-session", 600, 60, 600),
        "user-history": RateLimitPolicy("user-history", 120, 60, 120),
    }
    settings = Settings(elevenlabs_api_key=Secret("k"), rate_limits=limits)
    limiter = make_limiter()
    for _ in range(2):
        decision = await enforce(limiter, settings, "session", user_id="u1", agent_id="agent_1")
        assert [r.policy.name for r in decision.results] == ["user-session", "agent-session"]
    with pytest.raises(RateLimited) as caught:
        await enforce(limiter, settings, "session", user_id="u1", agent_id="agent_1")
    exc = caught.value
    assert exc.status == 429 and exc.code == "rate_limited"
    assert exc.extra == {"policy": "user-session"}
    assert exc.headers["Retry-After"] == str(exc.retry_after) == "6"
    assert [name for name, _ in parse_list(exc.headers["RateLimit"])] == ["user-session", "agent-session"]
    assert "RateLimit-Policy" in exc.headers
    # Another route class uses other keys; without an agent, agent policies are skipped.
    assert (await enforce(limiter, settings, "history", user_id="u1")).allowed
    with pytest.raises(ValueError, match="unknown rate-limit route class"):
        await enforce(limiter, settings, "nope", user_id="u1")


async def test_hostile_subjects_cannot_move_the_hash_tag() -> None:
    evil = Hit(policy(), "user:a}b{c")
    long = Hit(policy(), "user:" + "x" * 500)
    for hit in (evil, long):
        key = state_key(hit)
        assert key.count("{") == 1 and key.count("}") == 1 and len(key) < 80
    assert state_key(evil) != state_key(Hit(policy(), "user:a}b{d"))


async def test_a_user_id_no_utf8_can_carry_gets_401_not_a_500_or_another_users_budget(
    make_gateway: Callable[..., contextlib.AbstractAsyncContextManager[Gateway]],
) -> None:
    # JSON's "\ud800" escape gives a lone surrogate: Redis keys are UTF-8 with bad characters replaced,
    # so "\ud800" counted in the bucket of user "?", and a subject hashed for its braces raised (500).
    mint = "/v1/convai/conversation/get-signed-url"
    async with make_gateway() as gateway:
        for _ in range(5):  # user-session's burst
            assert (
                await gateway.client.get(mint, params=AGENT, headers=gateway.headers("?"))
            ).status_code == 200
        for sub in ("\ud800", "{\ud800}", "ok\udfff"):
            response = await gateway.client.get(mint, params=AGENT, headers=gateway.headers(sub))
            assert response.status_code == 401, (sub, response.status_code)
            assert response.json()["code"] == "invalid_token"


async def test_local_limiter_memory_is_bounded(clock: ManualClock) -> None:
    limiter = LocalRateLimiter(clock, max_keys=10)
    for index in range(100):
        assert (await limiter.acquire([Hit(policy(), f"user:{index}")])).allowed
    assert len(limiter) == 10
    clock.advance(3600)  # every state is stale: the next write sweeps them
    await limiter.acquire([Hit(policy(), "user:new")])
    assert len(limiter) == 1


async def test_empty_and_duplicate_hits(make_limiter: Factory) -> None:
    limiter = make_limiter()
    assert (await limiter.acquire([])).allowed
    hit = Hit(policy(burst=2), "user:dup")
    decision = await limiter.acquire([hit, hit])
    assert len(decision.results) == 1 and decision.results[0].remaining == 1
    assert math.isclose(decision.results[0].reset_after, 6.0)


async def test_rejected_request_reports_the_admitting_policies_as_they_stand(
    make_limiter: Factory, clock: ManualClock
) -> None:
    limiter = make_limiter()
    user = policy("user-session", limit=10, period=60, burst=1)  # T = 6 s
    agent = policy("agent-session", limit=600, period=60, burst=600)  # T = 0.1 s
    assert (await limiter.acquire([Hit(user, "user:a"), Hit(agent, "agent:x")])).allowed
    rejected = await limiter.acquire([Hit(user, "user:a"), Hit(agent, "agent:x")])
    assert not rejected.allowed
    # Nothing was stored for the agent: 599 of 600 are left, as one use ago, and 0.1 s until all are back.
    assert summary(rejected)[1] == (True, 599, 0.1, 0.0)
    admitted = await limiter.acquire([Hit(user, "user:b"), Hit(agent, "agent:x")])
    assert summary(admitted)[1] == (True, 598, 0.2, 0.0)


async def test_redis_state_of_another_type_counts_as_fresh_and_is_replaced(
    redis_url: str, redis_server: RedisServer, clock: ManualClock
) -> None:
    # A key of the wrong type (WRONGTYPE) is one subject's bad state, not a Redis outage.
    hit = Hit(policy(limit=10, period=60, burst=2), "user:odd")
    with contextlib.closing(redis_server.client()) as admin:
        admin.hset(state_key(hit), "x", "1")
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            limiter = RedisRateLimiter(client, clock=clock)
            assert summary(await limiter.acquire([hit])) == [(True, 1, 6.0, 0.0)]
            assert admin.type(state_key(hit)) == "string"
            assert (await limiter.acquire([hit])).allowed
            assert not (await limiter.acquire([hit])).allowed
        finally:
            await client.aclose()


async def test_local_limiter_drops_expired_keys_before_live_ones(clock: ManualClock) -> None:
    limiter = LocalRateLimiter(clock, max_keys=2)
    hourly = policy(limit=1, period=3600, burst=1)
    brief = policy("user-history", limit=100, period=1, burst=1)  # its state lasts 10 ms
    assert (await limiter.acquire([Hit(hourly, "user:victim")])).allowed
    assert (await limiter.acquire([Hit(brief, "user:x")])).allowed
    clock.advance(1.0)  # user:x's state has expired behind user:victim's live one
    assert (await limiter.acquire([Hit(brief, "user:y")])).allowed
    assert len(limiter) == 2
    assert not (await limiter.acquire([Hit(hourly, "user:victim")])).allowed, "a live key was evicted"

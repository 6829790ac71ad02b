"""Fixtures for the rate-limit tests: an injectable clock and async Redis clients on the private server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from service.redis_pipeline import PipeliningRedis
from service.settings import RateLimitPolicy

# Every limiter test runs on both clients the gateway may use: commands one by one (REDIS_PIPELINE_LIMIT=0,
# and the Cluster client's way) and implicit pipelining (the default for standalone and Sentinel).
CLIENT_KINDS = ["one-by-one", "pipelined"]


def async_client(url: str, kind: str) -> aioredis.Redis:
    """Return an async client (decoded strings) of the given kind."""
    client_class = PipeliningRedis if kind == "pipelined" else aioredis.Redis
    return client_class.from_url(url, decode_responses=True)


class ManualClock:
    """A clock that only moves when told to."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self.now += seconds


def policy(
    name: str = "user-session", limit: int = 10, period: float = 60, burst: int = 5, *, shadow: bool = False
) -> RateLimitPolicy:
    """Build a policy with readable defaults (T = 6 s, burst 5)."""
    return RateLimitPolicy(name, limit, period, burst, shadow)


@pytest.fixture
def clock() -> ManualClock:
    """Return a fresh manual clock."""
    return ManualClock()


@pytest.fixture(params=CLIENT_KINDS)
def client_kind(request: pytest.FixtureRequest) -> str:
    """Return which kind of async client the test's fixtures build."""
    kind: str = request.param
    return kind


@pytest.fixture
async def aredis(redis_url: str, client_kind: str) -> AsyncIterator[aioredis.Redis]:
    """Yield an async client (decoded strings) on the private, empty Redis."""
    client = async_client(redis_url, client_kind)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def redis_factory(
    redis_url: str, client_kind: str
) -> AsyncIterator[Callable[[], Awaitable[aioredis.Redis]]]:
    """Return a factory of extra async clients (own connection pools), all closed after the test."""
    clients: list[aioredis.Redis] = []

    async def make() -> aioredis.Redis:
        client = async_client(redis_url, client_kind)
        clients.append(client)
        return client

    try:
        yield make
    finally:
        for client in clients:
            await client.aclose()

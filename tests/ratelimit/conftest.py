"""Fixtures for the rate-limit tests: an injectable clock and async Redis clients on the private server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from service.settings import RateLimitPolicy


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


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """Yield an async client (decoded strings) on the private, empty Redis."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def redis_factory(redis_url: str) -> AsyncIterator[Callable[[], Awaitable[aioredis.Redis]]]:
    """Return a factory of extra async clients (own connection pools), all closed after the test."""
    clients: list[aioredis.Redis] = []

    async def make() -> aioredis.Redis:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        clients.append(client)
        return client

    try:
        yield make
    finally:
        for client in clients:
            await client.aclose()

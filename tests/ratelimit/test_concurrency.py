"""Exactness under concurrency: coroutines, several connections and several OS processes on one Redis."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import redis as sync_redis
import redis.asyncio as aioredis

from service.ratelimit import Hit, RedisRateLimiter, state_key
from tests.ratelimit.conftest import policy

REPO_ROOT = Path(__file__).resolve().parents[2]
ClientFactory = Callable[[], Awaitable[aioredis.Redis]]


@pytest.mark.parametrize(("attempts", "limit"), [(50, 1), (50, 10), (200, 37), (300, 150)])
async def test_concurrent_acquires_admit_exactly_the_limit(
    redis_factory: ClientFactory, attempts: int, limit: int
) -> None:
    # Several clients (own pools), each fanning out over many connections at once.
    limiters = [RedisRateLimiter(await redis_factory()) for _ in range(4)]
    hit = Hit(policy(limit=limit, period=3600, burst=limit), "user:race")
    decisions = await asyncio.gather(*(limiters[i % 4].acquire([hit]) for i in range(attempts)))
    assert sum(d.allowed for d in decisions) == limit
    assert sorted(d.results[0].remaining for d in decisions if d.allowed) == list(range(limit))


async def test_concurrent_multi_policy_requests_never_overspend_either_policy(
    redis_factory: ClientFactory,
) -> None:
    limiters = [RedisRateLimiter(await redis_factory()) for _ in range(3)]
    agent = Hit(policy("agent-session", limit=20, period=3600, burst=20), "agent:shared")
    user_policy = policy("user-session", limit=3, period=3600, burst=3)
    # 10 users x 5 attempts: each user may get 3, the agent only 20 of the 30 the users would allow.
    calls = [limiters[i % 3].acquire([Hit(user_policy, f"user:{i % 10}"), agent]) for i in range(50)]
    decisions = await asyncio.gather(*calls)
    admitted = [i % 10 for i, d in enumerate(decisions) if d.allowed]
    assert len(admitted) == 20
    assert max(admitted.count(user) for user in range(10)) <= 3


WORKER = textwrap.dedent(
    """
    import asyncio, sys
    import redis.asyncio as aioredis
    from service.ratelimit import Hit, RedisRateLimiter
    from service.settings import RateLimitPolicy

    async def main(url, attempts, limit):
        client = aioredis.Redis.from_url(url)
        try:
            limiter = RedisRateLimiter(client)
            hit = Hit(RateLimitPolicy("agent-session", limit, 3600, limit), "agent:global")
            await client.ping()
            print("ready", flush=True)
            sys.stdin.readline()  # start together
            decisions = await asyncio.gather(*(limiter.acquire([hit]) for _ in range(attempts)))
            print(sum(d.allowed for d in decisions), flush=True)
        finally:
            await client.aclose()

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
    """
)


@pytest.mark.parametrize("processes", [2, 3])
def test_separate_processes_share_one_exact_limit(redis_url: str, processes: int) -> None:
    limit, attempts = 45, 40  # every process alone could use more than its share
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, redis_url, str(attempts), str(limit)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
        )
        for _ in range(processes)
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None
            assert worker.stdout.readline().strip() == "ready"
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        counts = []
        for worker in workers:
            out, _ = worker.communicate(timeout=30)
            assert worker.returncode == 0
            counts.append(int(out.strip()))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
    # No process can take more than `attempts` (< limit), so the total proves they shared one budget.
    assert sum(counts) == limit


async def test_script_is_reloaded_after_script_flush(aredis: aioredis.Redis, redis_url: str) -> None:
    limiter = RedisRateLimiter(aredis)
    hit = Hit(policy(limit=3, period=3600, burst=3), "user:flush")
    assert (await limiter.acquire([hit])).allowed
    with sync_redis.Redis.from_url(redis_url) as admin:
        admin.script_flush()
        assert admin.script_exists(limiter._acquire_sha) == [False]
        decisions = [await limiter.acquire([hit]) for _ in range(3)]
        assert [d.allowed for d in decisions] == [True, True, False]  # the state survived the flush
        assert admin.script_exists(limiter._acquire_sha) == [True]
    assert await aredis.exists(state_key(hit)) == 1

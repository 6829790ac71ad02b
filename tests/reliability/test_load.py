"""A sustained, bounded load run on loopback: a mix of routes and users against the served gateway.

It demands zero 5xx and zero dropped connections, no lost ownership record (every minted
conversation_id is in Redis with the user who minted it), exact rate limits (each user gets exactly the
configured session budget, every other session request a 429) and flat memory once warm.
RELIABILITY_SCALE multiplies the number of requests.
"""

from __future__ import annotations

import contextlib
import gc
import time
from pathlib import Path

import httpx
import pytest

from tests.reliability.support import (
    CONVERSATIONS,
    GENEROUS_LIMITS,
    HARNESS_REDIS_TIMEOUT_MS,
    Op,
    Traffic,
    bearer,
    isolation_violations,
    lost_ledger_entries,
    minted,
    problem_violations,
    rss_bytes,
    scaled,
    seed_ownership,
    served_gateway,
    standard_ops,
    write_config,
)
from tests.support.servers import RedisServer

USERS = [f"load-user-{i:02d}" for i in range(20)]
SESSION_BUDGET = 20  # per user over the run: limit 20 per hour, burst 20
SESSION_OPS = ("mint", "token")
MAX_RSS_GROWTH_BYTES = 8 * 1024 * 1024  # measured: ~2 MiB, mostly the outcomes this test keeps


@pytest.mark.slow
async def test_sustained_mixed_load_has_no_errors_no_lost_entries_exact_limits_and_flat_memory(
    redis_server: RedisServer, redis_url: str, emulator_url: str, tmp_path: Path
) -> None:
    limits = {**GENEROUS_LIMITS, "user-session": (SESSION_BUDGET, SESSION_BUDGET)}
    config = write_config(tmp_path, limits, period_seconds=3600)
    headers = {user: bearer(user) for user in USERS}
    with contextlib.closing(redis_server.client()) as inspect:
        owned, foreign = await seed_ownership(emulator_url, inspect, USERS)
    ops = standard_ops(headers, owned, foreign)

    async def audio(client: httpx.AsyncClient, user: str) -> httpx.Response:
        return await client.get(f"{CONVERSATIONS}/{owned[user][1]}/audio", headers=headers[user])

    async def feedback(client: httpx.AsyncClient, user: str) -> httpx.Response:
        return await client.post(
            f"{CONVERSATIONS}/{owned[user][0]}/feedback", json={"feedback": "like"}, headers=headers[user]
        )

    mix: dict[str, Op] = {**ops, "audio": audio, "feedback": feedback}
    warmup, phase = scaled(400), scaled(1000)

    def keep_body(op: str, status: int) -> bool:
        # Only what the assertions read: minted ids and error bodies (200 details would swamp RSS).
        return op == "mint" or status != 200

    with served_gateway(
        emulator_url,
        redis_url,
        capture=False,
        GATEWAY_CONFIG=config,
        LOG_LEVEL="WARNING",
        REDIS_TIMEOUT_MS=HARNESS_REDIS_TIMEOUT_MS,
    ) as gateway:
        async with gateway.client() as client:
            async with Traffic(client, USERS, mix, concurrency=16, limit=warmup, keep_body=keep_body) as warm:
                await warm.wait_done()
            gc.collect()
            rss_warm = rss_bytes()
            started = time.monotonic()
            async with Traffic(client, USERS, mix, concurrency=16, limit=phase, keep_body=keep_body) as first:
                await first.wait_done()
            gc.collect()
            rss_first = rss_bytes()
            async with Traffic(
                client, USERS, mix, concurrency=16, limit=phase, keep_body=keep_body
            ) as second:
                await second.wait_done()
            elapsed = time.monotonic() - started
            gc.collect()
            rss_second = rss_bytes()

    outcomes = warm.outcomes + first.outcomes + second.outcomes
    assert len(outcomes) == warmup + 2 * phase
    assert problem_violations(outcomes, {404: {"not_found"}, 429: {"rate_limited"}}) == []
    assert [o for o in outcomes if o.status >= 500 or o.status == 0] == []
    assert isolation_violations(outcomes) == []
    with contextlib.closing(redis_server.client()) as inspect:
        lost = lost_ledger_entries(inspect, outcomes)
    assert lost == []

    # Exact limits: per user, the session budget is granted exactly once over the run, nothing else is limited.
    for user in USERS:
        session = [o for o in outcomes if o.user == user and o.op in SESSION_OPS]
        granted = sum(1 for o in session if o.status == 200)
        limited = [o for o in session if o.status == 429]
        assert len(session) > SESSION_BUDGET, "every user must hit its limit"
        assert granted == SESSION_BUDGET, (user, granted)
        assert len(limited) == len(session) - SESSION_BUDGET
        assert all(o.body["policy"] == "user-session" and int(o.headers["retry-after"]) >= 1 for o in limited)
    assert not any(o.status == 429 for o in outcomes if o.op not in SESSION_OPS)

    # Flat memory: once warm, another phase of the same size must not keep growing the process.
    growth = rss_second - rss_first
    assert growth < MAX_RSS_GROWTH_BYTES, f"RSS grew {growth / 2**20:.1f} MiB over the last {phase} requests"
    rate = 2 * phase / elapsed
    print(
        f"\nload: {len(outcomes)} requests from {len(USERS)} users, {rate:.0f} req/s, "
        f"statuses {Traffic.by_status_of(outcomes)}, {len(minted(outcomes))} signed URLs all in the ledger, "
        f"RSS {rss_warm / 2**20:.1f} -> {rss_first / 2**20:.1f} -> {rss_second / 2**20:.1f} MiB"
    )

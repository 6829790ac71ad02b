"""The ownership ledger: one suite for the Redis and in-process implementations, plus their own specifics."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from service.errors import ServiceUnavailable
from service.ledger import (
    SECONDS_PER_DAY,
    InProcessLedger,
    Ledger,
    LedgerEntry,
    LedgerUnavailable,
    RedisLedger,
    build_ledger,
    decode_entry,
    encode_entry,
    ledger_key,
)
from service.ratelimit import Decision, Hit, RedisRateLimiter
from service.redis_client import close_redis, create_redis
from service.redis_pipeline import PipeliningRedis
from service.settings import RateLimitPolicy, RedisTopology, Secret, Settings
from tests.support.gateway import Gateway
from tests.support.servers import RedisServer

TTL_DAYS = 7
T0 = 1_750_000_000.0


class FakeClock:
    """A settable clock for TTL tests."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Subject:
    """A ledger under test and, for the Redis one, a synchronous client to inspect Redis directly."""

    ledger: Ledger
    clock: FakeClock
    inspect: redis.Redis | None


def async_client(url: str, *, decode: bool, pipelined: bool = False) -> aioredis.Redis:
    """Return an asyncio client that fails fast instead of retrying with backoff."""
    client_class = PipeliningRedis if pipelined else aioredis.Redis
    return client_class.from_url(
        url,
        decode_responses=decode,
        socket_timeout=1.0,
        socket_connect_timeout=1.0,
        retry=Retry(NoBackoff(), 0),
    )


@pytest.fixture(params=["redis-bytes", "redis-str", "redis-pipelined", "in-process"])
async def subject(request: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    """Yield each ledger implementation, empty."""
    clock = FakeClock()
    if request.param == "in-process":
        yield Subject(InProcessLedger(ttl_days=TTL_DAYS, clock=clock), clock, None)
        return
    url: str = request.getfixturevalue("redis_url")
    client = async_client(
        url, decode=request.param != "redis-bytes", pipelined=request.param == "redis-pipelined"
    )
    server: RedisServer = request.getfixturevalue("redis_server")
    with contextlib.closing(server.client()) as inspect:
        try:
            yield Subject(RedisLedger(client, ttl_days=TTL_DAYS), clock, inspect)
        finally:
            await client.aclose()


@pytest.fixture
async def redis_ledger(redis_url: str) -> AsyncIterator[RedisLedger]:
    """Yield a RedisLedger on the private Redis."""
    client = async_client(redis_url, decode=False)
    try:
        yield RedisLedger(client, ttl_days=TTL_DAYS)
    finally:
        await client.aclose()


@pytest.fixture
def inspect(redis_server: RedisServer, redis_url: str) -> Iterator[redis.Redis]:
    """Yield a synchronous client of the private Redis."""
    with contextlib.closing(redis_server.client()) as client:
        yield client


def entry(user: str = "user_a", agent: str = "agent_demo", minted_at: int = int(T0)) -> LedgerEntry:
    """Build a ledger entry."""
    return LedgerEntry(user_id=user, agent_id=agent, minted_at=minted_at)


# --- the shared suite ---------------------------------------------------------------------------------


async def test_record_then_lookup_returns_the_entry(subject: Subject) -> None:
    await subject.ledger.record("conv_1", entry())
    assert await subject.ledger.lookup("conv_1") == entry()


async def test_lookup_of_an_unknown_conversation_is_none(subject: Subject) -> None:
    await subject.ledger.record("conv_1", entry())
    assert await subject.ledger.lookup("conv_2") is None


async def test_record_replaces_the_previous_entry(subject: Subject) -> None:
    await subject.ledger.record("conv_1", entry(user="user_a"))
    await subject.ledger.record("conv_1", entry(user="user_b", agent="agent_other", minted_at=5))
    assert await subject.ledger.lookup("conv_1") == entry(user="user_b", agent="agent_other", minted_at=5)


async def test_lookup_many_returns_only_known_ids(subject: Subject) -> None:
    await subject.ledger.record("conv_1", entry(user="user_a"))
    await subject.ledger.record("conv_3", entry(user="user_b"))
    found = await subject.ledger.lookup_many(["conv_1", "conv_2", "conv_3", "conv_1"])
    assert found == {"conv_1": entry(user="user_a"), "conv_3": entry(user="user_b")}


async def test_lookup_many_of_nothing_is_empty(subject: Subject) -> None:
    await subject.ledger.record("conv_1", entry())
    assert await subject.ledger.lookup_many([]) == {}


async def test_remove_forgets_the_conversation_and_tolerates_unknown_ids(subject: Subject) -> None:
    await subject.ledger.record("conv_1", entry())
    await subject.ledger.record("conv_2", entry())
    await subject.ledger.remove("conv_1")
    await subject.ledger.remove("conv_never_recorded")
    assert await subject.ledger.lookup("conv_1") is None
    assert await subject.ledger.lookup("conv_2") == entry()


async def test_ping_answers_true_when_storage_is_up(subject: Subject) -> None:
    assert await subject.ledger.ping() is True


async def test_entries_carry_the_ledger_ttl(subject: Subject) -> None:
    await subject.ledger.record("conv_1", entry())
    ttl = TTL_DAYS * SECONDS_PER_DAY
    if subject.inspect is not None:
        remaining = subject.inspect.ttl(ledger_key("conv_1"))
        assert ttl - 5 <= remaining <= ttl
    else:
        subject.clock.now = T0 + ttl - 1
        assert await subject.ledger.lookup("conv_1") == entry()
        subject.clock.now = T0 + ttl
        assert await subject.ledger.lookup("conv_1") is None
        assert await subject.ledger.lookup_many(["conv_1"]) == {}


# --- Redis specifics ----------------------------------------------------------------------------------


async def test_redis_entry_is_compact_json_under_a_hash_tagged_key(
    redis_ledger: RedisLedger, inspect: redis.Redis
) -> None:
    await redis_ledger.record("conv_9", entry(user="user_z", agent="agent_other", minted_at=123))
    assert inspect.keys("ledger:*") == ["ledger:{conv_9}"]
    stored = inspect.get("ledger:{conv_9}")
    assert stored is not None
    assert json.loads(stored) == {"user": "user_z", "agent_id": "agent_other", "minted_at": 123}


async def test_redis_unreadable_entry_fails_closed(redis_ledger: RedisLedger, inspect: redis.Redis) -> None:
    inspect.set(ledger_key("conv_bad"), "not json")
    inspect.set(ledger_key("conv_partial"), json.dumps({"user": "user_a"}))
    with pytest.raises(LedgerUnavailable):
        await redis_ledger.lookup("conv_bad")
    with pytest.raises(LedgerUnavailable):
        await redis_ledger.lookup_many(["conv_partial"])


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "",
        " " + encode_entry(LedgerEntry("user_a", "agent_a", 1)),
        encode_entry(LedgerEntry("user_a", "agent_a", 1)) + " trailing",
        encode_entry(LedgerEntry("user_a", "agent_a", 1)) + "{}",
        '{"user":"user_a","agent_id":"agent_a","minted_at":true}',
        '{"user":"user_a","agent_id":"agent_a","minted_at":1.5}',
        '{"user":"user_a","agent_id":7,"minted_at":1}',
        '["user_a","agent_a",1]',
        b"\xff\xfe",
    ],
)
def test_decode_entry_refuses_anything_but_one_entry(raw: str | bytes) -> None:
    with pytest.raises(LedgerUnavailable, match="unreadable"):
        decode_entry(raw)


@pytest.mark.parametrize("user", ["usér_ä", "user_\ud800"], ids=["non-ascii", "lone-surrogate"])
@pytest.mark.parametrize("encoded", [str, lambda text: text.encode("utf-8")], ids=["str", "bytes"])
def test_decode_entry_reads_back_what_encode_entry_wrote(
    encoded: Callable[[str], str | bytes], user: str
) -> None:
    original = LedgerEntry(user, "agent_a", 1_764_000_000)

    assert decode_entry(encoded(encode_entry(original))) == original


async def test_redis_outage_raises_ledger_unavailable_and_ping_is_false(
    redis_ledger: RedisLedger, redis_server: RedisServer
) -> None:
    await redis_ledger.record("conv_1", entry())
    redis_server.stop()
    try:
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: redis_ledger.record("conv_2", entry()),
            lambda: redis_ledger.lookup("conv_1"),
            lambda: redis_ledger.lookup_many(["conv_1", "conv_2"]),
            lambda: redis_ledger.remove("conv_1"),
        ]
        for call in calls:
            with pytest.raises(LedgerUnavailable) as caught:
                await call()
            assert isinstance(caught.value, ServiceUnavailable)
            assert caught.value.status == 503
        assert await redis_ledger.ping() is False
    finally:
        redis_server.start()
    # Recovers by itself once Redis is back (its data is gone: the test server does not persist).
    await redis_ledger.record("conv_3", entry())
    assert await redis_ledger.lookup("conv_3") == entry()
    assert await redis_ledger.ping() is True


# --- in-process specifics -----------------------------------------------------------------------------


async def test_in_process_ledger_evicts_the_oldest_entry_when_full() -> None:
    clock = FakeClock()
    ledger = InProcessLedger(ttl_days=1, clock=clock, max_entries=2)
    await ledger.record("conv_1", entry(user="u1"))
    clock.now += 1
    await ledger.record("conv_2", entry(user="u2"))
    clock.now += 1
    await ledger.record("conv_3", entry(user="u3"))
    assert len(ledger) == 2
    assert await ledger.lookup("conv_1") is None
    assert await ledger.lookup_many(["conv_2", "conv_3"]) == {
        "conv_2": entry(user="u2"),
        "conv_3": entry(user="u3"),
    }


async def test_in_process_ledger_purges_expired_entries_on_write() -> None:
    clock = FakeClock()
    ledger = InProcessLedger(ttl_days=1, clock=clock)
    await ledger.record("conv_1", entry())
    await ledger.record("conv_2", entry())
    clock.now += SECONDS_PER_DAY
    await ledger.record("conv_3", entry())
    assert len(ledger) == 1
    assert await ledger.lookup("conv_3") == entry()


async def test_in_process_rerecord_restarts_the_ttl() -> None:
    clock = FakeClock()
    ledger = InProcessLedger(ttl_days=1, clock=clock)
    await ledger.record("conv_1", entry(user="old"))
    clock.now += SECONDS_PER_DAY - 10
    await ledger.record("conv_1", entry(user="new"))
    clock.now += 20
    assert await ledger.lookup("conv_1") == entry(user="new")


def test_ledgers_reject_nonsense_limits() -> None:
    with pytest.raises(ValueError, match="ttl_days"):
        InProcessLedger(ttl_days=0)
    with pytest.raises(ValueError, match="max_entries"):
        InProcessLedger(ttl_days=1, max_entries=0)
    with pytest.raises(ValueError, match="ttl_days"):
        RedisLedger(object(), ttl_days=0)


# --- build_ledger -------------------------------------------------------------------------------------


async def test_build_ledger_uses_redis_when_a_client_is_given(redis_url: str) -> None:
    settings = Settings(elevenlabs_api_key=Secret("k"), redis=RedisTopology(url=redis_url), ledger_ttl_days=3)
    client = async_client(redis_url, decode=False)
    try:
        ledger = build_ledger(settings, client)
        assert isinstance(ledger, RedisLedger)
        assert ledger.ttl_seconds == 3 * SECONDS_PER_DAY
    finally:
        await client.aclose()


def test_build_ledger_without_redis_is_in_process() -> None:
    ledger = build_ledger(Settings(elevenlabs_api_key=Secret("k"), ledger_ttl_days=2), None)
    assert isinstance(ledger, InProcessLedger)
    assert ledger.ttl_seconds == 2 * SECONDS_PER_DAY


def test_build_ledger_refuses_configured_redis_without_a_client() -> None:
    settings = Settings(elevenlabs_api_key=Secret("k"), redis=RedisTopology(url="redis://127.0.0.1:1/0"))
    with pytest.raises(ValueError, match="Redis is configured"):
        build_ledger(settings, None)


# --- bad bytes in Redis (the production client, as create_redis builds it) -------------------------


@pytest.fixture
async def production_client(redis_url: str) -> AsyncIterator[Any]:
    """Yield the gateway's own Redis client (implicit pipelining, decoding as in production)."""
    client = create_redis(RedisTopology(url=redis_url), timeout=1.0)
    try:
        yield client
    finally:
        await close_redis(client)


async def test_entry_that_is_not_utf8_or_nested_too_deep_fails_closed(
    production_client: Any, inspect: redis.Redis
) -> None:
    # Both once escaped the ledger as a 500: UnicodeDecodeError and RecursionError are no RedisError.
    inspect.set(ledger_key("conv_bytes"), b"\xff\xfe not utf-8")
    inspect.set(ledger_key("conv_deep"), "[" * 100_000)
    ledger = RedisLedger(production_client, ttl_days=TTL_DAYS)
    for conversation_id in ("conv_bytes", "conv_deep"):
        with pytest.raises(LedgerUnavailable):
            await ledger.lookup(conversation_id)
        with pytest.raises(LedgerUnavailable):
            await ledger.lookup_many([conversation_id])


async def test_unreadable_entry_fails_only_its_own_command_of_a_pipeline(
    production_client: Any, inspect: redis.Redis
) -> None:
    inspect.set(ledger_key("conv_bytes"), b"\xff\xfe not utf-8")
    ledger = RedisLedger(production_client, ttl_days=TTL_DAYS)
    await ledger.record("conv_good", entry())
    limiter = RedisRateLimiter(production_client)
    # Issued in one loop turn, the three commands travel in one implicit pipeline.
    bad, good, decision = await asyncio.gather(
        ledger.lookup("conv_bytes"),
        ledger.lookup("conv_good"),
        limiter.acquire([Hit(RateLimitPolicy("user-history", 120, 60, 120, False), "user:bob")]),
        return_exceptions=True,
    )
    assert isinstance(bad, LedgerUnavailable)
    assert good == entry()
    assert isinstance(decision, Decision) and decision.allowed


async def test_gateway_answers_503_for_an_unreadable_entry(
    make_gateway: Callable[..., AbstractAsyncContextManager[Gateway]], inspect: redis.Redis
) -> None:
    async with make_gateway() as gw:
        inspect.set(ledger_key("conv_bytes"), b"\xff\xfe not utf-8")
        response = await gw.client.get("/v1/convai/conversations/conv_bytes", headers=gw.headers("alice"))
    assert response.status_code == 503
    assert response.json()["code"] == "ledger_unavailable"

"""Implicit pipelining (`PipeliningRedis`) against the private redis-server: batching, errors, limits, close."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis as sync_redis
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.redis_client import close_redis, create_redis
from service.redis_pipeline import HiredisPacking, PipeliningRedis
from service.settings import RedisTopology
from tests.ratelimit.test_resilience import start_debug_sleep
from tests.support.servers import RedisServer

# Typed Any like the service holds it: redis-py annotates its async commands as plain Awaitables.
MakeClient = Callable[..., Any]
# Every connection of a client under test names itself, so other connections to the server never count.
CLIENT_NAME = "pipelining-under-test"


@pytest.fixture
async def make_client(redis_url: str) -> AsyncIterator[MakeClient]:
    """Return a factory of production-built clients (`create_redis`), all closed after the test."""
    async with contextlib.AsyncExitStack() as closing:

        def make(*, pipeline_limit: int = 100, timeout: float = 0.5) -> Any:
            client = create_redis(
                RedisTopology(url=redis_url), timeout=timeout, pipeline_limit=pipeline_limit
            )
            closing.push_async_callback(close_redis, client)
            client.connection_pool.connection_kwargs["client_name"] = CLIENT_NAME
            return client

        yield make


@pytest.fixture
def admin(redis_server: RedisServer, redis_url: str) -> Iterator[sync_redis.Redis]:
    """Yield a synchronous client to look at the server from outside the clients under test."""
    with redis_server.client() as client:
        yield client


def connections_under_test(admin: sync_redis.Redis) -> int:
    """Count the server's connections opened by clients under test."""
    return sum(1 for entry in admin.client_list() if entry["name"] == CLIENT_NAME)


async def test_commands_of_one_loop_turn_travel_on_one_connection(
    make_client: MakeClient, admin: sync_redis.Redis
) -> None:
    client = make_client()
    replies = await asyncio.gather(*(client.set(f"k{i}", str(i)) for i in range(50)))
    assert replies == [True] * 50
    assert connections_under_test(admin) == 1
    assert admin.mget([f"k{i}" for i in range(50)]) == [str(i) for i in range(50)]


async def test_without_pipelining_each_concurrent_command_takes_a_connection(
    make_client: MakeClient, admin: sync_redis.Redis
) -> None:
    client = make_client(pipeline_limit=0)
    assert type(client) is Redis
    await asyncio.gather(*(client.set(f"k{i}", str(i)) for i in range(20)))
    assert connections_under_test(admin) == 20


async def test_a_batch_never_holds_more_than_the_limit(
    make_client: MakeClient, admin: sync_redis.Redis
) -> None:
    client = make_client(pipeline_limit=10)
    await asyncio.gather(*(client.set(f"k{i}", str(i)) for i in range(25)))
    # 10 + 10 + 5: three batches in flight at once, each on its own pooled connection.
    assert connections_under_test(admin) == 3


async def test_each_caller_gets_its_own_reply(make_client: MakeClient, admin: sync_redis.Redis) -> None:
    admin.mset({f"k{i}": f"v{i}" for i in range(300)})
    client = make_client(pipeline_limit=64)
    replies = await asyncio.gather(
        *(client.get(f"k{i}") for i in range(300)),
        *(client.incrby(f"n{i}", i) for i in range(300)),
    )
    assert replies == [f"v{i}" for i in range(300)] + list(range(300))


async def test_a_command_error_reaches_only_its_caller(
    make_client: MakeClient, admin: sync_redis.Redis
) -> None:
    admin.set("text", "not a number")
    client = make_client()
    replies = await asyncio.gather(
        client.set("a", "1"),
        client.evalsha("0" * 40, 0),
        client.incr("text"),
        client.get("a"),
        return_exceptions=True,
    )
    assert replies[0] is True and replies[3] == "1"
    assert isinstance(replies[1], NoScriptError)
    assert isinstance(replies[2], ResponseError) and "not an integer" in str(replies[2])


async def test_an_argument_redis_cannot_encode_fails_only_its_caller(
    make_client: MakeClient, admin: sync_redis.Redis
) -> None:
    admin.set("a", "1")
    client = make_client()
    # Packing the batch raised DataError for every command of it: the neighbours of one bad call failed too
    # (and each failure fed the limiter's circuit breaker as if Redis were down).
    replies = await asyncio.gather(
        client.get("a"), client.set("b", None), client.set("c", "3"), return_exceptions=True
    )
    assert replies[0] == "1" and replies[2] is True, replies
    assert isinstance(replies[1], DataError)
    assert admin.mget(["b", "c"]) == [None, "3"]


async def test_a_cancelled_caller_leaves_the_others_and_the_connection_intact(
    make_client: MakeClient, admin: sync_redis.Redis
) -> None:
    admin.mset({"a": "1", "b": "2", "c": "3"})
    client = make_client()
    victim = asyncio.create_task(client.get("a"))
    others = [asyncio.create_task(client.get(key)) for key in ("b", "c")]
    # One loop turn, not a wait: every task has queued its command and none can have its reply yet.
    await asyncio.sleep(0)
    victim.cancel()
    async with asyncio.timeout(5):  # a bound, not a wait: a dropped reply must not strand its neighbours
        assert await asyncio.gather(*others) == ["2", "3"]
    with pytest.raises(asyncio.CancelledError):
        await victim
    # The cancelled reply was read off the wire and dropped: the next batch reads its own replies.
    assert list(await asyncio.gather(client.get("c"), client.get("a"))) == ["3", "1"]


async def test_a_batch_cancelled_before_it_starts_cancels_its_callers(
    make_client: MakeClient, admin: sync_redis.Redis
) -> None:
    admin.set("a", "1")
    client = make_client()
    callers = [asyncio.create_task(client.get("a")) for _ in range(3)]
    await asyncio.sleep(0)  # one loop turn: the callers have queued; their batch's task has not run yet
    # What asyncio.run's teardown does: cancel every task, the batch's among them, before it ever ran.
    for task in asyncio.all_tasks() - {asyncio.current_task(), *callers}:
        task.cancel()
    async with asyncio.timeout(5):  # a bound, not a wait: no caller may be left waiting forever
        outcomes = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(outcome, asyncio.CancelledError) for outcome in outcomes), outcomes
    # The next command opens a batch of its own.
    assert await client.get("a") == "1"


async def test_a_dead_server_fails_every_caller_then_the_client_recovers(
    make_client: MakeClient, redis_server: RedisServer
) -> None:
    client = make_client()
    assert await client.ping()
    redis_server.stop()
    failures = await asyncio.gather(*(client.get(f"k{i}") for i in range(5)), return_exceptions=True)
    assert all(isinstance(failure, RedisConnectionError) for failure in failures), failures
    redis_server.start()
    assert list(await asyncio.gather(client.set("k", "v"), client.get("missing"))) == [True, None]


async def test_a_batch_on_connections_the_server_dropped_is_retried_on_fresh_ones(
    make_client: MakeClient, admin: sync_redis.Redis
) -> None:
    admin.set("a", "1")
    client = make_client()
    # One batch: one pooled connection, about to go stale.
    await asyncio.gather(client.get("a"), client.get("a"), client.incr("n"))
    assert connections_under_test(admin) == 1
    admin.client_kill_filter(_type="normal", skipme=True)
    # The first attempt finds the connection closed ("Connection closed by server"); the client's one
    # immediate retry sends the whole batch again on a fresh connection: no caller sees the drop.
    replies = await asyncio.gather(client.get("a"), client.incr("n"), client.get("missing"))
    assert list(replies) == ["1", 2, None]
    assert connections_under_test(admin) == 1


async def test_a_stalled_server_fails_the_batch_within_its_deadline(
    make_client: MakeClient, redis_server: RedisServer
) -> None:
    client = make_client(timeout=0.1)
    assert await client.ping()
    sleeper = await asyncio.to_thread(start_debug_sleep, redis_server.port, 0.6)
    try:
        failures = await asyncio.gather(*(client.get(f"k{i}") for i in range(5)), return_exceptions=True)
    finally:
        await asyncio.to_thread(sleeper.recv, 64)
        sleeper.close()
    # Timeouts, not replies: the 100 ms batch deadline ended the batch while the server still slept.
    assert all(isinstance(failure, RedisTimeoutError) for failure in failures), failures
    assert await client.get("k0") is None  # the timed-out connection was dropped, not reused out of step


async def test_a_lone_command_to_a_stalled_server_times_out_and_the_connection_is_not_reused(
    make_client: MakeClient, redis_server: RedisServer
) -> None:
    client = make_client(timeout=0.1)
    assert await client.set("k", "before")
    sleeper = await asyncio.to_thread(start_debug_sleep, redis_server.port, 0.6)
    try:
        # Bounded from outside: without its own deadline the command would wait out the whole sleep.
        with pytest.raises(RedisTimeoutError, match="did not answer"):
            await asyncio.wait_for(client.set("k", "during"), timeout=0.4)
    finally:
        await asyncio.to_thread(sleeper.recv, 64)
        sleeper.close()
    # The SET may have run once the server woke; its late +OK must not be read as the next reply.
    assert await client.get("missing") is None
    assert await client.get("k") in ("before", "during")


async def test_close_sends_what_is_queued_and_waits_for_batches_in_flight(
    make_client: MakeClient, admin: sync_redis.Redis
) -> None:
    client = make_client()
    writes = [asyncio.create_task(client.set(f"k{i}", "v")) for i in range(10)]
    await asyncio.sleep(0)  # one loop turn: the writes are queued, not yet sent
    await client.aclose()
    assert await asyncio.gather(*writes) == [True] * 10
    assert admin.exists(*(f"k{i}" for i in range(10))) == 10


@pytest.mark.parametrize("server_up", [True, False])
async def test_close_right_after_a_batch_finished_returns(
    make_client: MakeClient, redis_server: RedisServer, server_up: bool
) -> None:
    client = make_client()
    if not server_up:
        redis_server.stop()
    with contextlib.suppress(RedisConnectionError):
        await client.set("k", "v")
    # The batch's task is done, but the done-callback that takes it off the in-flight set has not had its turn
    # yet. From Python 3.12 on, gather() of tasks that are all done completes without yielding, and close used
    # to wait on that set in a loop that never let the callback run: a hang at 100 % CPU.
    assert [task.done() for task in client._in_flight] == [True]
    await client.aclose()
    assert not [task for task in client._in_flight if not task.done()]


async def test_explicit_pipelines_and_transactions_bypass_the_batching(make_client: MakeClient) -> None:
    client = make_client()
    async with client.pipeline(transaction=True) as transaction:
        transaction.set("a", "1").incr("a").get("a")
        assert await transaction.execute() == [True, 2, "2"]


def test_create_redis_pipelines_standalone_clients_with_the_given_limit(redis_url: str) -> None:
    client = create_redis(RedisTopology(url=redis_url), timeout=0.1, pipeline_limit=7)
    assert isinstance(client, PipeliningRedis) and client.pipeline_limit == 7


@pytest.mark.parametrize(
    "command",
    [
        ("MGET", "ledger:{conv_1}", "ledger:{conv_2}"),
        ("SET", "k", "é ✓", "EX", 86_400),
        ("EVALSHA", b"\x00\xff", 2, 1.5, 1e20, -0.0, 10**30),
        ("SCRIPT LOAD", "return 1"),
        ("SET", "k", "lone \ud800 surrogate"),
        ("SET", "k", memoryview(b"view")),
    ],
)
def test_connections_pack_commands_exactly_as_redis_py_does(
    make_client: MakeClient, command: tuple[Any, ...]
) -> None:
    pool = make_client().connection_pool
    connection = pool.make_connection()
    assert isinstance(connection, HiredisPacking)
    reference = Connection(**pool.connection_kwargs)  # redis-py's own packer, same encoder settings
    assert b"".join(connection.pack_command(*command)) == b"".join(reference.pack_command(*command))


def test_connections_refuse_what_redis_py_refuses(make_client: MakeClient) -> None:
    connection = make_client().connection_pool.make_connection()
    for bad in (None, True):
        with pytest.raises(DataError):
            connection.pack_command("SET", "k", bad)

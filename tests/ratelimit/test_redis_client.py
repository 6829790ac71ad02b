"""`create_redis` against real servers: redis:// and unix:// URLs, and a real Sentinel."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from service.ratelimit import Hit, RedisRateLimiter
from service.redis_client import QuickCheckoutPool, close_redis, create_redis
from service.redis_pipeline import PipeliningRedis
from service.settings import GATEWAY_OWNED_REDIS_OPTIONS, RedisTopology, load_settings
from tests.ratelimit.conftest import policy
from tests.support.servers import RedisSentinel, RedisServer, TlsRedisServer
from tests.support.tls import TlsFiles

# The variables load_settings needs besides REDIS_URL.
SETTINGS_ENV = {"ELEVENLABS_API_KEY": "xi-key", "JWT_HS256_SECRET": "s" * 32, "ALLOWED_AGENT_IDS": "agent_a"}


async def test_url_client_has_short_timeouts_and_only_reconnects_once(redis_url: str) -> None:
    client = create_redis(RedisTopology(url=redis_url), timeout=0.25)
    try:
        assert isinstance(client, PipeliningRedis)
        assert isinstance(client.connection_pool, QuickCheckoutPool)
        kwargs = client.connection_pool.connection_kwargs
        # The budget bounds each whole batch; redis-py's per-operation socket timeout stays off.
        assert client.batch_timeout == 0.25 and kwargs["socket_timeout"] is None
        assert kwargs["socket_connect_timeout"] == 0.25
        # One immediate reconnect after a connection error (stale pooled connection), never a timeout retry.
        assert kwargs["retry"].get_retries() == 1
        assert await client.ping()
        decision = await RedisRateLimiter(client).acquire([Hit(policy(), "user:url")])
        assert decision.allowed
    finally:
        await close_redis(client)


async def test_a_client_without_pipelining_keeps_the_socket_timeout(redis_url: str) -> None:
    client = create_redis(RedisTopology(url=redis_url), timeout=0.25, pipeline_limit=1)
    try:
        assert type(client) is Redis
        assert client.connection_pool.connection_kwargs["socket_timeout"] == 0.25
        assert await client.ping()
    finally:
        await close_redis(client)


@pytest.mark.parametrize("pipeline_limit", [100, 1])
def test_every_connection_option_the_gateway_sets_is_refused_in_redis_url(pipeline_limit: int) -> None:
    # A URL option overrides the keyword argument of the same name, so settings refuse each one the gateway
    # passes: an option added to create_redis without joining that list fails here.
    url = "redis://127.0.0.1:1/0?client_name=probe"
    ours = create_redis(RedisTopology(url=url), timeout=0.25, pipeline_limit=pipeline_limit)
    plain = Redis.from_url(url)
    added = set(ours.connection_pool.connection_kwargs) - set(plain.connection_pool.connection_kwargs)
    assert added and added <= GATEWAY_OWNED_REDIS_OPTIONS


async def test_a_unix_socket_url_connects_and_the_limiter_counts_there() -> None:
    directory = Path(tempfile.mkdtemp(prefix="convai-unix-"))
    path = directory / "redis.sock"
    server = RedisServer(extra_args=("--unixsocket", str(path), "--unixsocketperm", "700"))
    server.start()
    try:
        client = create_redis(RedisTopology(url=f"unix://{path}"), timeout=0.5)
        try:
            assert await client.ping()
            assert (await RedisRateLimiter(client).acquire([Hit(policy(), "user:unix")])).allowed
            assert await client.exists("rl:{user:unix}:user-session") == 1
        finally:
            await close_redis(client)
    finally:
        server.close()
        shutil.rmtree(directory, ignore_errors=True)


async def test_a_rediss_url_whose_options_pass_the_check_connects_with_them(tls_files: TlsFiles) -> None:
    # Every TLS option at once, as check-config accepts them: the check must not let through a value that
    # redis-py would refuse or that would fail the connection.
    server = TlsRedisServer(tls_files.ca, tls_files.server_cert, tls_files.server_key)
    server.start()
    try:
        options = (
            f"ssl_cert_reqs=required&ssl_ca_certs={tls_files.ca}&ssl_ca_path={tls_files.directory}"
            f"&ssl_certfile={tls_files.client_cert}&ssl_keyfile={tls_files.client_key}&ssl_check_hostname=yes"
            "&ssl_min_version=772&ssl_ciphers=ECDHE%2BAESGCM&socket_keepalive=true&max_connections=5"
            "&health_check_interval=30&client_name=gw-tls"
            "&ssl_include_verify_flags=VERIFY_X509_STRICT,VERIFY_X509_PARTIAL_CHAIN"
            "&ssl_exclude_verify_flags=[VERIFY_X509_TRUSTED_FIRST]"
        )
        env = {**SETTINGS_ENV, "REDIS_URL": f"rediss://127.0.0.1:{server.tls_port}/2?{options}"}
        client = create_redis(load_settings(env).redis, timeout=2.0)
        try:
            assert await client.ping()
            assert await client.client_getname() == "gw-tls"
            assert (await client.client_info())["db"] == 2
        finally:
            await close_redis(client)
    finally:
        server.close()


@pytest.fixture
def sentinel(redis_server: RedisServer, redis_url: str) -> Iterator[tuple[str, int]]:
    """Run a real redis-sentinel monitoring the private Redis as `gwmaster`; yield its address."""
    server = RedisSentinel("gwmaster", redis_server.port)
    try:
        server.start()
        yield server.address
    finally:
        server.close()


async def test_sentinel_topology_resolves_the_master(
    sentinel: tuple[str, int], redis_server: RedisServer
) -> None:
    topology = RedisTopology(url="redis://127.0.0.1/0", sentinels=(sentinel,), sentinel_service="gwmaster")
    client = create_redis(topology, timeout=0.5)
    try:
        assert isinstance(client, PipeliningRedis)  # the master client pipelines like a standalone one
        assert isinstance(client.connection_pool, QuickCheckoutPool)
        assert client.batch_timeout == 0.5
        assert client.connection_pool.connection_kwargs["socket_timeout"] is None
        attached = getattr(client, "_convai_sentinel", None)
        assert isinstance(attached, Sentinel)
        assert attached.sentinels[0].connection_pool.connection_kwargs["retry"].get_retries() == 1
        assert await client.ping()
        assert (await RedisRateLimiter(client).acquire([Hit(policy(), "user:sentinel")])).allowed
        with redis_server.client() as admin:
            assert admin.exists("rl:{user:sentinel}:user-session") == 1  # written on the monitored master
    finally:
        await close_redis(client)


def test_create_redis_needs_a_url() -> None:
    with pytest.raises(ValueError, match="no Redis configured"):
        create_redis(RedisTopology(), timeout=0.1)


# ------------------------------------------------------------------------------------------ QuickCheckoutPool


async def test_quick_checkouts_reuse_one_idle_connection(redis_url: str) -> None:
    client = create_redis(RedisTopology(url=redis_url), timeout=1.0)
    try:
        pool = client.connection_pool
        for number in range(20):
            assert await client.set(f"quick:{number}", "v")
        assert len(pool._available_connections) == 1
        assert not pool._in_use_connections
    finally:
        await close_redis(client)


async def test_a_checkout_takes_no_connection_while_the_pool_lock_is_held(redis_url: str) -> None:
    # redis-py's re-auth and maintenance handlers hold the lock across awaits while they change connections:
    # a checkout must wait for them, as it does in redis-py's own pool.
    client = create_redis(RedisTopology(url=redis_url), timeout=1.0)
    try:
        assert await client.ping()
        pool = client.connection_pool
        idle = list(pool._available_connections)
        async with pool._lock:
            checkout = asyncio.create_task(pool.get_connection())
            await asyncio.sleep(0)  # the checkout's first step, where a quick one takes the connection
            assert pool._available_connections == idle
            assert not pool._in_use_connections
        connection = await checkout
        assert connection is idle[0]
        async with pool._lock:
            giving_back = asyncio.create_task(pool.release(connection))
            await asyncio.sleep(0)
            assert connection in pool._in_use_connections
            assert connection not in pool._available_connections
        await giving_back
        assert pool._available_connections == [connection]
    finally:
        await close_redis(client)


async def test_a_connection_marked_for_reconnect_is_closed_when_returned(redis_url: str) -> None:
    client = create_redis(RedisTopology(url=redis_url), timeout=1.0)
    try:
        pool = client.connection_pool
        connection = await pool.get_connection()
        assert connection.is_connected
        connection.mark_for_reconnect()
        await pool.release(connection)
        assert not connection.is_connected
        assert await client.ping()  # and the next checkout connects it again
    finally:
        await close_redis(client)


async def _return_with_an_unread_reply(client: Redis) -> None:
    """Send a GET of `stray` on a pooled connection and give the connection back with its reply unread."""
    pool = client.connection_pool
    connection = await pool.get_connection()  # type: ignore[no-untyped-call]
    await connection.send_command("GET", "stray")
    async with asyncio.timeout(5):
        while not connection._reader._buffer:  # the reply arrived, unread
            await asyncio.sleep(0)
    await pool.release(connection)


async def _assert_an_unread_reply_answers_nothing(client: Redis) -> None:
    # redis-py 8.1 skips its checkout check for pending data while maintenance notifications are "auto", its
    # default: the next command on that connection read the GET's reply as its own (another key's value).
    await client.set("stray", "the value of stray")
    await client.set("mine", "the value of mine")
    await _return_with_an_unread_reply(client)
    assert await client.get("mine") == "the value of mine"
    assert await client.get("stray") == "the value of stray"


async def test_a_connection_returned_with_an_unread_reply_answers_no_later_command(redis_url: str) -> None:
    client = create_redis(RedisTopology(url=redis_url), timeout=1.0)
    try:
        await _assert_an_unread_reply_answers_nothing(client)
    finally:
        await close_redis(client)


async def test_a_sentinel_master_connection_returned_with_an_unread_reply_answers_no_later_command(
    sentinel: tuple[str, int],
) -> None:
    topology = RedisTopology(url="redis://127.0.0.1/0", sentinels=(sentinel,), sentinel_service="gwmaster")
    client = create_redis(topology, timeout=1.0)
    try:
        await _assert_an_unread_reply_answers_nothing(client)
    finally:
        await close_redis(client)


async def test_a_connection_left_stale_by_a_redis_restart_is_reconnected_at_checkout(
    redis_server: RedisServer, redis_url: str
) -> None:
    client = create_redis(RedisTopology(url=redis_url), timeout=1.0)
    try:
        assert await client.ping()
        (idle,) = client.connection_pool._available_connections
        idle.retry = Retry(NoBackoff(), 0)  # no second attempt: the checkout must notice by itself
        redis_server.stop()
        redis_server.start()
        async with asyncio.timeout(5):
            while not idle._reader.at_eof():  # the server's closing has reached the idle connection
                await asyncio.sleep(0)
        assert await client.ping()
    finally:
        await close_redis(client)

"""The whole gateway on a real Redis Sentinel group (master, replica, sentinel on loopback) and its failover.

The gateway is built by `create_app` from a GATEWAY_CONFIG naming only the sentinels, so every Redis
command reaches the master the sentinels name. The failover test kills the master with SIGKILL and lets the
sentinel promote the replica, while the test keeps calling the gateway: it must answer the documented 503s
(or serve through the limiter's local fallback) during the outage, never a 500 and never hang, and serve
again from the new master by itself, without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio.sentinel import SentinelManagedSSLConnection
from redis.exceptions import ResponseError

from service.ledger import decode_entry, ledger_key
from service.redis_client import close_redis, create_redis
from service.settings import RedisTopology
from tests.conftest import EMULATOR_API_KEY
from tests.support.gateway import Gateway, run_gateway
from tests.support.servers import (
    RedisServer,
    SentinelGroup,
    replication_info,
    sentinel_group,
    wait_for,
)
from tests.support.tls import TlsFiles

SERVICE = "gwmaster"
SIGNED_URL = "/v1/convai/conversation/get-signed-url"
TOKEN = "/v1/convai/conversation/token"
CONVERSATIONS = "/v1/convai/conversations"
AGENT = "agent_demo"

# The test client, the emulator and the gateway share one process: on a loaded machine an event-loop stall
# of the harness must not pass for a Redis timeout (as in tests/reliability).
REDIS_TIMEOUT_MS = "500"

# No request of the failover test reaches these limits, yet a request's GCRA state lives in Redis for
# 3.6 s (one interval), long enough for the test to find it there.
GENEROUS = {name: (1_000, 1_000) for name in ("user-session", "agent-session", "user-history")}

# A deadline for the whole failover (detection after down-after-milliseconds = 500, promotion, the
# limiter's 5 s circuit cooldown): generous for a loaded 2-core machine; it takes a few seconds.
FAILOVER_DEADLINE_SECONDS = 30.0

# No request may take longer than this during the outage: each Redis step is bounded by REDIS_TIMEOUT_MS
# (a mint has two: the limiter and the ledger), plus the sentinel query; far above that is a hang.
REQUEST_BOUND_SECONDS = 3.0

# The pace of the polling loops (a request set, then this pause): often enough to see the outage's end.
POLL_SECONDS = 0.05


@pytest.fixture
def group() -> Iterator[SentinelGroup]:
    """Yield a started group: a master, one replica in sync, one sentinel (quorum 1) that knows both."""
    with sentinel_group(SERVICE) as started:
        yield started


def write_config(directory: Path, group: SentinelGroup, limits: Mapping[str, tuple[int, int]]) -> str:
    """Write a GATEWAY_CONFIG that reaches Redis through the group's sentinels only; return its path."""
    host, port = group.sentinel.address
    lines = ["[redis]", f'sentinels = ["{host}:{port}"]', f'sentinel_service = "{SERVICE}"', ""]
    for name, (limit, burst) in limits.items():
        lines += [
            f"[rate_limits.{name}]",
            f"limit = {limit}",
            "period_seconds = 3600",
            f"burst = {burst}",
            "",
        ]
    path = directory / "gateway.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return str(path)


@contextlib.asynccontextmanager
async def gateway_on(
    emulator_url: str, group: SentinelGroup, directory: Path, limits: Mapping[str, tuple[int, int]]
) -> AsyncIterator[Gateway]:
    """Run a gateway (no REDIS_URL) whose Redis is the group's master, in the ledger-only ownership mode."""
    env = {
        "GATEWAY_CONFIG": write_config(directory, group, limits),
        "OWNERSHIP_MODE": "ledger",  # only the ledger grants a conversation: a read proves the ledger works
        "REDIS_TIMEOUT_MS": REDIS_TIMEOUT_MS,
    }
    async with run_gateway(emulator_url, EMULATOR_API_KEY, None, env) as gateway:
        yield gateway


async def mint(gw: Gateway, user: str) -> httpx.Response:
    """Ask the gateway for a signed URL for `user`."""
    return await gw.client.get(SIGNED_URL, params={"agent_id": AGENT}, headers=gw.headers(user))


async def seed(gw: Gateway, conversation_id: str, user_id: str) -> None:
    """Create the minted conversation in the emulator, as the conversation WebSocket would."""
    body = {"conversation_id": conversation_id, "agent_id": AGENT, "user_id": user_id}
    (await gw.emulator.post("/_emulator/conversations", json=body)).raise_for_status()


def ledger_owner(server: RedisServer, conversation_id: str) -> str | None:
    """Return the user the ledger on `server` records for the conversation, or None."""
    with contextlib.closing(server.client()) as client:
        raw = client.get(ledger_key(conversation_id))
    return None if raw is None else decode_entry(raw).user_id


def has_key(server: RedisServer, key: str) -> bool:
    """Tell whether `server` holds `key`."""
    with contextlib.closing(server.client()) as client:
        return bool(client.exists(key))


# ------------------------------------------------------------------------------------------- steady state


async def test_rate_limits_and_ledger_work_through_sentinel(
    group: SentinelGroup, emulator_url: str, tmp_path: Path
) -> None:
    limits = {"user-session": (2, 2)}
    async with gateway_on(emulator_url, group, tmp_path, limits) as gw:
        ready = await gw.client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["mode"]["ledger"] == "redis"

        minted = await mint(gw, "alice")
        assert minted.status_code == 200, minted.text
        conversation_id = minted.json()["conversation_id"]
        # Written on the master the sentinel names, and replicated from there.
        assert ledger_owner(group.master, conversation_id) == "alice"
        assert has_key(group.master, "rl:{user:alice}:user-session")
        replica = group.replicas[0]
        wait_for(lambda: ledger_owner(replica, conversation_id) == "alice", "the entry on the replica", 10)

        await seed(gw, conversation_id, "alice")
        listed = await gw.client.get(CONVERSATIONS, headers=gw.headers("alice"))
        assert listed.status_code == 200, listed.text
        assert [c["conversation_id"] for c in listed.json()["conversations"]] == [conversation_id]
        own = await gw.client.get(f"{CONVERSATIONS}/{conversation_id}", headers=gw.headers("alice"))
        assert own.status_code == 200, own.text
        foreign = await gw.client.get(f"{CONVERSATIONS}/{conversation_id}", headers=gw.headers("mallory"))
        assert foreign.status_code == 404

        # The limit counts in Redis across requests: the burst of 2 is spent by the second mint.
        assert (await mint(gw, "alice")).status_code == 200
        limited = await mint(gw, "alice")
        assert limited.status_code == 429, limited.text
        assert limited.json()["code"] == "rate_limited" and int(limited.headers["Retry-After"]) >= 1
        assert (await mint(gw, "bob")).status_code == 200  # another user has its own budget


async def test_redis_url_options_reach_the_master_connections_through_sentinel(group: SentinelGroup) -> None:
    # REDIS_URL alongside the sentinels: only its credentials and database used to be taken, the other options
    # silently dropped.
    url = "redis://127.0.0.1/3?client_name=gw-sentinel&health_check_interval=30&max_connections=7&socket_keepalive=y"
    topology = RedisTopology(url=url, sentinels=(group.sentinel.address,), sentinel_service=SERVICE)
    client = create_redis(topology, timeout=float(REDIS_TIMEOUT_MS) / 1000)
    try:
        await client.set("sentinel-options", "1")
        with contextlib.closing(group.master.client()) as admin:
            ours = [c for c in admin.client_list() if c["name"] == "gw-sentinel"]
            assert ours and all(c["db"] == "3" for c in ours), admin.client_list()
        pool = client.connection_pool
        assert pool.max_connections == 7
        assert pool.connection_kwargs["health_check_interval"] == 30
        assert pool.connection_kwargs["socket_keepalive"] is True
    finally:
        await close_redis(client)


def test_tls_options_of_redis_url_reach_the_master_pool_through_sentinel(tls_files: TlsFiles) -> None:
    # No TLS sentinel group here (a sentinel names the master's plaintext port): the pool is built, not used.
    url = f"rediss://:pw@primary/0?ssl_ca_certs={tls_files.ca}&ssl_cert_reqs=required&ssl_min_version=772"
    topology = RedisTopology(url=url, sentinels=(("127.0.0.1", 1),), sentinel_service=SERVICE)
    client = create_redis(topology, timeout=0.5)
    pool = client.connection_pool
    assert issubclass(pool.connection_class, SentinelManagedSSLConnection)
    kwargs = pool.connection_kwargs
    assert kwargs["ssl_ca_certs"] == str(tls_files.ca) and kwargs["ssl_cert_reqs"] == "required"
    assert kwargs["ssl_min_version"] == 772 and kwargs["password"] == "pw"
    assert "host" not in kwargs and "port" not in kwargs  # the sentinels name the master


# ----------------------------------------------------------------------------------- the background recheck


async def recheck_rounds(client: Any, rounds: int) -> None:
    """Send commands until the client's pool has asked the sentinels `rounds` more times in the background."""
    pool = client.connection_pool
    done = 0
    last = pool._checked_at
    deadline = time.monotonic() + FAILOVER_DEADLINE_SECONDS
    while done < rounds:
        assert time.monotonic() < deadline, f"only {done} sentinel rechecks"
        await client.set("recheck", "1")  # the master stays up: each command may start a recheck
        task = pool._recheck
        if task is not None:
            await asyncio.wait([task])
        if pool._checked_at != last and pool._recheck is None:
            done, last = done + 1, pool._checked_at
        await asyncio.sleep(POLL_SECONDS / 5)  # the pace of the commands; rechecks come every recheck_seconds


async def test_sentinels_that_stop_answering_are_logged_once_and_their_return_too(
    group: SentinelGroup, caplog: pytest.LogCaptureFixture
) -> None:
    topology = RedisTopology(sentinels=(group.sentinel.address,), sentinel_service=SERVICE)
    client = create_redis(topology, timeout=0.5)
    client.connection_pool.recheck_seconds = 0.05  # many rechecks in little time
    caplog.set_level(logging.INFO, logger="service.redis_client")
    try:
        await recheck_rounds(client, 2)
        assert not [r for r in caplog.records if r.name == "service.redis_client"]

        group.sentinel.stop()
        await recheck_rounds(client, 6)  # commands still succeed: only the sentinels are gone
        failing = [r for r in caplog.records if r.name == "service.redis_client"]
        assert [r.levelno for r in failing] == [logging.WARNING], failing
        assert SERVICE in failing[0].getMessage()

        group.sentinel.start()
        await recheck_rounds(client, 4)
        logged = [r for r in caplog.records if r.name == "service.redis_client"]
        assert [r.levelno for r in logged] == [logging.WARNING, logging.INFO], logged
        assert SERVICE in logged[1].getMessage()
    finally:
        await close_redis(client)


async def test_a_recheck_cancelled_before_it_first_runs_does_not_end_the_rechecks(
    group: SentinelGroup,
) -> None:
    # A task cancelled before its first step never runs its body, so a reset in the recheck's own `finally` never
    # ran and the pool, seeing a recheck still "in flight", would never ask the sentinels again.
    topology = RedisTopology(sentinels=(group.sentinel.address,), sentinel_service=SERVICE)
    client = create_redis(topology, timeout=5.0)
    pool = client.connection_pool
    cancelled: list[asyncio.Task[None]] = []

    def cancel_the_new_recheck() -> None:
        task = pool._recheck
        assert task is not None and not task.done()
        task.cancel()
        cancelled.append(task)

    try:
        await client.set("recheck", "1")  # a pooled connection to the master, found through the sentinel
        pool.recheck_seconds = 0  # every command starts a recheck
        # Queued before the command creates its recheck, so it runs before the recheck's first step.
        asyncio.get_running_loop().call_soon(cancel_the_new_recheck)
        await pool.release(await pool.get_connection())
        await asyncio.sleep(0)  # one pass of the loop, if the command did not yield: the queued cancel runs
        (recheck,) = cancelled
        await asyncio.wait([recheck])
        assert recheck.cancelled()
        assert pool._recheck is None
        await recheck_rounds(client, 2)  # and the sentinels are asked again
    finally:
        await close_redis(client)


async def test_a_close_cancelled_while_it_stops_the_recheck_is_cancelled(group: SentinelGroup) -> None:
    topology = RedisTopology(sentinels=(group.sentinel.address,), sentinel_service=SERVICE)
    client = create_redis(topology, timeout=5.0)
    pool = client.connection_pool
    assert group.sentinel.process is not None
    try:
        await client.set("recheck", "1")  # a pooled connection to the master, found through the sentinel
        pool.recheck_seconds = 0  # every command starts a recheck
        # The next recheck hangs: the sentinel never answers.
        group.sentinel.process.send_signal(signal.SIGSTOP)
        await client.set("recheck", "2")
        recheck = pool._recheck
        assert recheck is not None
        closing = asyncio.get_running_loop().create_task(close_redis(client))
        while not recheck.cancelling():  # until close_redis has cancelled the recheck and waits for it
            await asyncio.sleep(0)
        closing.cancel()
        # The recheck's cancellation was suppressed, and the caller's with it: close_redis carried on.
        with pytest.raises(asyncio.CancelledError):
            await closing
    finally:
        group.sentinel.process.send_signal(signal.SIGCONT)
        await close_redis(client)


async def test_a_close_in_the_cleanup_of_a_cancelled_task_still_runs_to_the_end(group: SentinelGroup) -> None:
    # The caller's cancellation requested before the close began (a shutdown's cleanup) is not the close's to raise.
    topology = RedisTopology(sentinels=(group.sentinel.address,), sentinel_service=SERVICE)
    client = create_redis(topology, timeout=5.0)
    pool = client.connection_pool
    assert group.sentinel.process is not None
    closed = asyncio.Event()
    started = asyncio.Event()

    async def serve_then_close() -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        finally:
            await close_redis(client)
            closed.set()

    try:
        await client.set("recheck", "1")
        pool.recheck_seconds = 0
        group.sentinel.process.send_signal(signal.SIGSTOP)
        await client.set("recheck", "2")
        assert pool._recheck is not None  # in flight, hanging on the sentinel
        serving = asyncio.get_running_loop().create_task(serve_then_close())
        await started.wait()
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
        assert closed.is_set()
    finally:
        group.sentinel.process.send_signal(signal.SIGCONT)
        await close_redis(client)


# ------------------------------------------------------------------------------------------------ failover


@dataclass(frozen=True)
class Seen:
    """One gateway answer during the failover."""

    what: str
    status: int
    code: str | None
    seconds: float


async def call(
    gw: Gateway, what: str, path: str, user: str | None = None, params: dict[str, str] | None = None
) -> tuple[Seen, httpx.Response]:
    """GET `path` (as `user`, if given), timing it; return what was seen and the response."""
    headers = gw.headers(user) if user else None
    started = time.monotonic()
    response = await gw.client.get(path, params=params, headers=headers)
    seconds = time.monotonic() - started
    body = response.json()
    code = body.get("code") if response.status_code >= 400 and isinstance(body, dict) else None
    return Seen(what, response.status_code, code, seconds), response


async def test_gateway_recovers_by_itself_when_the_sentinel_promotes_the_replica(
    group: SentinelGroup, emulator_url: str, tmp_path: Path
) -> None:
    old_master, replica = group.master, group.replicas[0]
    async with gateway_on(emulator_url, group, tmp_path, GENEROUS) as gw:
        before = await mint(gw, "alice")
        assert before.status_code == 200, before.text
        kept = before.json()["conversation_id"]
        await seed(gw, kept, "alice")
        with contextlib.closing(old_master.client()) as client:
            assert client.wait(1, 5000) == 1  # the replica has the entry before the master dies

        old_master.kill()
        killed = time.monotonic()
        seen: list[Seen] = []
        recovered_at: float | None = None
        outage_readiness: list[dict[str, Any]] = []
        while recovered_at is None:
            assert time.monotonic() - killed < FAILOVER_DEADLINE_SECONDS, f"not recovered; saw {seen}"
            minted_seen, minted = await call(gw, "mint", SIGNED_URL, "alice", {"agent_id": AGENT})
            read_seen, _ = await call(gw, "read", f"{CONVERSATIONS}/{kept}", "alice")
            token_seen, _ = await call(gw, "token", TOKEN, "alice", {"agent_id": AGENT})
            ready_seen, ready = await call(gw, "readyz", "/readyz")
            seen += [minted_seen, read_seen, token_seen, ready_seen]
            if ready.status_code == 503:
                outage_readiness.append(ready.json()["checks"]["redis"])
            if minted.status_code == read_seen.status == ready.status_code == 200:
                recovered_at = time.monotonic()
                new_conversation = minted.json()["conversation_id"]
            else:
                await asyncio.sleep(POLL_SECONDS)  # the pace of the polling, leaving the CPU to the sentinel

        # The sentinel promoted the replica, and the gateway writes there now, without a restart.
        assert group.wait_for_failover(away_from=old_master) is replica
        assert ledger_owner(replica, new_conversation) == "alice"
        assert ledger_owner(replica, kept) == "alice"  # written before the failover, still granted
        # The limiter returns to Redis too (after its circuit's cooldown): a new user's state appears there.
        key = "rl:{user:carol}:user-session"
        deadline = time.monotonic() + FAILOVER_DEADLINE_SECONDS
        while not has_key(replica, key):
            assert time.monotonic() < deadline, "the rate limiter never wrote to the new master"
            assert (await mint(gw, "carol")).status_code == 200
            await asyncio.sleep(POLL_SECONDS)
        foreign = await gw.client.get(f"{CONVERSATIONS}/{kept}", headers=gw.headers("mallory"))
        assert foreign.status_code == 404

    # During the outage: never a 500, nothing hung, and only the documented answers.
    allowed: dict[str, set[tuple[int, str | None]]] = {
        "mint": {(200, None), (503, "ledger_unavailable")},
        "read": {(200, None), (503, "ledger_unavailable")},
        "token": {(200, None)},  # RATE_LIMIT_ON_REDIS_ERROR=local keeps limiting in process
        "readyz": {(200, None), (503, None)},
    }
    unexpected = [s for s in seen if (s.status, s.code) not in allowed[s.what]]
    assert not unexpected, unexpected
    slow = [s for s in seen if s.seconds > REQUEST_BOUND_SECONDS]
    assert not slow, slow
    # The outage was seen (the master was gone before the first request), and /readyz said which check failed.
    assert {(s.status, s.code) for s in seen if s.what == "mint"} == allowed["mint"]
    assert outage_readiness and all(check["ok"] is False for check in outage_readiness)


async def request_switchover(group: SentinelGroup) -> None:
    """Ask the sentinel to promote the replica, once it has a replica it may promote."""
    # A sentinel promotes only a replica that answered its PING within the last 5 s and its INFO recently: until
    # its first answers, SENTINEL FAILOVER is refused with NOGOODSLAVE (seen under a loaded CI machine).
    deadline = time.monotonic() + FAILOVER_DEADLINE_SECONDS
    with contextlib.closing(group.sentinel.client()) as client:
        while True:
            try:
                assert client.sentinel_failover(SERVICE)
                return
            except ResponseError as exc:
                if "NOGOODSLAVE" not in str(exc) or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(POLL_SECONDS)  # condition wait: the sentinel pings its replicas every second


async def test_gateway_follows_a_switchover_before_the_old_master_is_demoted(
    group: SentinelGroup, emulator_url: str, tmp_path: Path
) -> None:
    old_master, replica = group.master, group.replicas[0]
    async with gateway_on(emulator_url, group, tmp_path, GENEROUS) as gw:
        for _ in range(3):  # connections to the master are pooled now
            assert (await mint(gw, "alice")).status_code == 200
        await request_switchover(group)
        # The replica is master now and follows no one: an entry found there was written there.
        assert group.wait_for_failover(away_from=old_master) is replica
        # The sentinel demotes the old master only seconds later, and until then it still accepts writes,
        # which its resync from the new master then discards: a ledger entry minted there is lost.
        deadline = time.monotonic() + FAILOVER_DEADLINE_SECONDS
        while True:
            assert replication_info(old_master)["role"] == "master", (
                "the gateway kept writing to the old master until the sentinel demoted it"
            )
            assert time.monotonic() < deadline, "the gateway never wrote to the new master"
            minted = await mint(gw, "alice")
            assert minted.status_code == 200, minted.text
            if ledger_owner(replica, minted.json()["conversation_id"]) == "alice":
                break
            await asyncio.sleep(POLL_SECONDS)

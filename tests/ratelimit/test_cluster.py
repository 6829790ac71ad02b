"""The limiter on a real 3-master Redis Cluster (loopback), built through `create_redis`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ClusterDownError, RedisError

from service.ledger import LedgerEntry, LedgerUnavailable, RedisLedger, ledger_key
from service.ratelimit import Decision, Hit, RateLimiterUnavailable, RedisRateLimiter, interval_us, state_key
from service.redis_client import REDIS_ERRORS, close_redis, create_redis
from service.settings import RateLimitPolicy, RedisTopology
from tests.ratelimit.conftest import ManualClock, policy
from tests.ratelimit.test_resilience import start_debug_sleep
from tests.support.servers import RedisServer, free_port


@pytest.fixture(scope="module")
def cluster_nodes() -> Iterator[list[RedisServer]]:
    """Start three cluster-enabled redis-servers and join them into one cluster (no replicas)."""
    # An explicit bus port: the default (port + 10000) fails for ephemeral ports above 55535.
    nodes = [
        RedisServer(
            extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(free_port()),
            )
        )
        for _ in range(3)
    ]  # fmt: skip
    try:
        for node in nodes:
            node.start()
        cli = shutil.which("redis-cli")
        assert cli is not None
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes), "--cluster-replicas", "0",
             "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        for node in nodes:
            with contextlib.closing(node.client()) as client:
                # Condition wait: every node must see all slots assigned before clients connect.
                while client.cluster("info")["cluster_state"] != "ok":
                    assert time.monotonic() < deadline, "cluster did not converge"
                    time.sleep(0.05)
        yield nodes
    finally:
        for node in nodes:
            node.close()


@pytest.fixture
async def cluster(cluster_nodes: list[RedisServer]) -> AsyncIterator[RedisCluster]:
    """Yield a cluster client (via create_redis) on an emptied cluster."""
    for node in cluster_nodes:
        with contextlib.closing(node.client()) as client:
            client.flushall()
    seed = f"redis://127.0.0.1:{cluster_nodes[0].port}"
    redis = create_redis(RedisTopology(url=seed, cluster=True), timeout=0.5)
    assert isinstance(redis, RedisCluster)
    try:
        yield redis
    finally:
        await close_redis(redis)


USER = policy("user-session", limit=10, period=60, burst=2)  # T = 6 s, exact in binary
AGENT = policy("agent-session", limit=10, period=60, burst=3)


def node_of(nodes: list[RedisServer], key: str) -> sync_redis.Redis:
    """Return a plain client on the node that owns `key`."""
    for node in nodes:
        client = node.client()
        if client.cluster("countkeysinslot", key_slot(key.encode())) or client.exists(key):
            return client
        client.close()
    raise AssertionError(f"no node holds {key}")


async def test_user_and_agent_keys_sit_in_different_slots(cluster: RedisCluster) -> None:
    user_key, agent_key = state_key(Hit(USER, "user:alice")), state_key(Hit(AGENT, "agent:agent_x"))
    assert key_slot(user_key.encode()) != key_slot(agent_key.encode())
    # All keys of one subject share a slot, whatever the policy.
    assert key_slot(user_key.encode()) == key_slot(
        state_key(Hit(policy("user-history"), "user:alice")).encode()
    )


async def test_burst_and_refill_on_cluster(cluster: RedisCluster) -> None:
    clock = ManualClock()
    limiter = RedisRateLimiter(cluster, clock=clock)
    hits = [Hit(USER, "user:alice"), Hit(AGENT, "agent:agent_x")]
    assert [(await limiter.acquire(hits)).allowed for _ in range(3)] == [True, True, False]
    clock.advance(6)
    assert [(await limiter.acquire(hits)).allowed for _ in range(2)] == [True, False]


async def test_rejection_in_one_slot_refunds_the_other(
    cluster: RedisCluster, cluster_nodes: list[RedisServer]
) -> None:
    clock = ManualClock()
    limiter = RedisRateLimiter(cluster, clock=clock)
    user, agent = Hit(USER, "user:bob"), Hit(AGENT, "agent:agent_y")
    for _ in range(2):
        assert (await limiter.acquire([user, agent])).allowed
    agent_node = node_of(cluster_nodes, state_key(agent))
    try:
        before = agent_node.get(state_key(agent))
        decision = await limiter.acquire([user, agent])  # the user policy rejects; the agent slot allowed
        assert not decision.allowed and [r.allowed for r in decision.results] == [False, True]
        assert agent_node.get(state_key(agent)) == before  # its reservation was returned
    finally:
        agent_node.close()
    # The agent's third unit is still there for another user.
    assert (await limiter.acquire([Hit(USER, "user:carol"), agent])).allowed
    assert not (await limiter.acquire([Hit(USER, "user:dave"), agent])).allowed


async def test_concurrent_cross_slot_requests_admit_exactly_the_agent_budget(cluster: RedisCluster) -> None:
    limiter = RedisRateLimiter(cluster)
    generous = policy("user-session", limit=100, period=3600, burst=100)
    agent = Hit(policy("agent-session", limit=17, period=3600, burst=17), "agent:hot")
    decisions = await asyncio.gather(
        *(limiter.acquire([Hit(generous, f"user:{i}"), agent]) for i in range(60))
    )
    assert sum(d.allowed for d in decisions) == 17


async def test_script_reloads_on_every_node(cluster: RedisCluster, cluster_nodes: list[RedisServer]) -> None:
    limiter = RedisRateLimiter(cluster)
    hits = [Hit(USER, "user:flush"), Hit(AGENT, "agent:flush")]
    assert (await limiter.acquire(hits)).allowed
    for node in cluster_nodes:
        with contextlib.closing(node.client()) as client:
            client.script_flush()
    assert (await limiter.acquire(hits)).allowed
    assert not (await limiter.acquire(hits)).allowed


async def test_ledger_round_trips_across_cluster_slots(cluster: RedisCluster) -> None:
    ledger = RedisLedger(cluster, ttl_days=1)
    ids = [f"conv_{i:026d}" for i in range(40)]
    assert len({key_slot(ledger_key(i).encode()) for i in ids}) > 1, "ids must spread over slots"
    for index, conversation in enumerate(ids):
        await ledger.record(
            conversation, LedgerEntry(f"user{index % 3}", "agent_demo", 1_700_000_000 + index)
        )
    found = await ledger.lookup_many([*ids, "conv_missing"])
    assert set(found) == set(ids)
    assert found[ids[4]] == LedgerEntry("user1", "agent_demo", 1_700_000_004)
    await ledger.remove(ids[0])
    assert await ledger.lookup(ids[0]) is None
    assert await ledger.ping()


def empty_cluster_config(cluster_nodes: list[RedisServer], directory: object) -> tuple[str, str]:
    """Flush every node and write a GATEWAY_CONFIG selecting Cluster mode; return its path and a seed URL."""
    for node in cluster_nodes:
        with contextlib.closing(node.client()) as client:
            client.flushall()
    config = Path(str(directory)) / "gateway.toml"
    config.write_text("[redis]\ncluster = true\n")
    return str(config), f"redis://127.0.0.1:{cluster_nodes[0].port}"


async def test_gateway_on_a_cluster_mints_and_enforces_ownership(
    cluster_nodes: list[RedisServer], emulator_url: str, tmp_path: pytest.TempPathFactory
) -> None:
    from tests.conftest import EMULATOR_API_KEY
    from tests.support.gateway import run_gateway

    config, seed = empty_cluster_config(cluster_nodes, tmp_path)
    async with run_gateway(emulator_url, EMULATOR_API_KEY, seed, {"GATEWAY_CONFIG": str(config)}) as gw:
        assert (await gw.client.get("/readyz")).status_code == 200
        minted = await gw.client.get(
            "/v1/convai/conversation/get-signed-url",
            params={"agent_id": "agent_demo"},
            headers=gw.headers("alice"),
        )
        assert minted.status_code == 200, minted.text
        conversation_id = minted.json()["conversation_id"]
        # The emulator records the conversation as someone else's; the ledger on the cluster decides.
        seeded = await gw.emulator.post(
            "/_emulator/conversations",
            json={"conversation_id": conversation_id, "agent_id": "agent_demo", "user_id": "mallory"},
        )
        assert seeded.status_code == 200, seeded.text
        own = await gw.client.get(f"/v1/convai/conversations/{conversation_id}", headers=gw.headers("alice"))
        foreign = await gw.client.get(
            f"/v1/convai/conversations/{conversation_id}", headers=gw.headers("mallory")
        )
        assert own.status_code == 200
        assert foreign.status_code == 404
        assert "RateLimit" in minted.headers
    owners = []
    for node in cluster_nodes:
        with contextlib.closing(node.client()) as client:
            owners += [client.get(key) for key in client.keys("ledger:*")]
    assert len(owners) == 1 and '"alice"' in str(owners[0])


# What the test itself sends to a node: its INFO reads, and DEBUG SLEEP with its PING probe.
OWN_COMMANDS = frozenset({"cmdstat_info", "cmdstat_debug", "cmdstat_ping"})


def commands_seen(node: sync_redis.Redis) -> Counter[str]:
    """Return how often `node` has executed each command (INFO commandstats), the test's own left out."""
    stats = node.info("commandstats")
    return Counter({name: int(entry["calls"]) for name, entry in stats.items() if name not in OWN_COMMANDS})


async def test_a_timed_out_command_is_not_retried(
    cluster: RedisCluster, cluster_nodes: list[RedisServer]
) -> None:
    # redis-py's cluster client retries timeouts by default; a retry would double the Redis time budget.
    from service.ratelimit import RateLimiterUnavailable
    from tests.ratelimit.test_resilience import start_debug_sleep

    limiter = RedisRateLimiter(cluster)
    hit = Hit(policy("user-session", limit=100, period=60, burst=100), "user:slow")  # always allowed
    await limiter.acquire([hit])  # topology, connection and script in place
    owner = node_of(cluster_nodes, state_key(hit))
    try:
        # What one acquire on a warm connection makes the owner execute: EVALSHA and the script's calls.
        before = commands_seen(owner)
        await limiter.acquire([hit])
        one_acquire = commands_seen(owner) - before
        assert one_acquire["cmdstat_evalsha"] == 1, one_acquire

        port = owner.connection_pool.connection_kwargs["port"]
        before = commands_seen(owner)
        # Every attempt is sent while the node sleeps (one sent after it woke would be answered, not time
        # out), and the node executes them all the moment it wakes, their connections closed or not.
        sleeper = await asyncio.to_thread(start_debug_sleep, port, 3.0)
        try:
            with pytest.raises(RateLimiterUnavailable):
                await limiter.acquire([hit])
        finally:
            await asyncio.to_thread(sleeper.recv, 64)  # "+OK": the node is awake
            sleeper.close()
        # Condition wait, bounded: the commands queued during the sleep run as the node wakes.
        deadline = time.monotonic() + 5
        while (seen := commands_seen(owner) - before)["cmdstat_evalsha"] == 0:
            assert time.monotonic() < deadline, "the timed-out EVALSHA never reached its node"
            await asyncio.sleep(0.01)
        # Exactly one acquire's worth: a retry would add a second EVALSHA, or the handshake (HELLO) of
        # the fresh connection it needs.
        assert seen == one_acquire
    finally:
        owner.close()


async def test_gateway_starts_while_the_cluster_is_down(
    emulator_url: str, tmp_path: pytest.TempPathFactory
) -> None:
    from pathlib import Path

    from tests.conftest import EMULATOR_API_KEY
    from tests.support.gateway import run_gateway

    config = Path(str(tmp_path)) / "gateway.toml"
    config.write_text("[redis]\ncluster = true\n")
    dead_seed = f"redis://127.0.0.1:{free_port()}"
    # As with a standalone Redis down at start: the gateway serves, /readyz says 503, `open` admits.
    async with run_gateway(
        emulator_url,
        EMULATOR_API_KEY,
        dead_seed,
        {"GATEWAY_CONFIG": str(config), "RATE_LIMIT_ON_REDIS_ERROR": "open"},
    ) as gw:
        assert (await gw.client.get("/readyz")).status_code == 503
        minted = await gw.client.get(
            "/v1/convai/conversation/get-signed-url",
            params={"agent_id": "agent_demo"},
            headers=gw.headers("alice"),
        )
        assert minted.status_code == 503 and minted.json()["code"] == "ledger_unavailable"


# ---------------------------------------------------------------------------------------------- cluster down


def owner_port(nodes: list[RedisServer], key: str) -> int:
    """Return the port of the master that serves `key`'s slot, as the cluster's topology says."""
    slot = key_slot(key.encode())
    with contextlib.closing(nodes[0].client()) as client:
        ranges = client.cluster("slots")
    return next(int(primary[1]) for start, end, primary, *_ in ranges if start <= slot <= end)


def on_node(nodes: list[RedisServer], port: int, prefix: str) -> str:
    """Return the first `<prefix><n>` whose slot the master on `port` serves."""
    return next(f"{prefix}{n:026d}" for n in range(10_000) if owner_port(nodes, f"{prefix}{n:026d}") == port)


def subject_on(nodes: list[RedisServer], port: int, kind: str, rate_policy: RateLimitPolicy) -> str:
    """Return the first subject `<kind>:h5-<n>` whose key for `rate_policy` the master on `port` serves."""
    for n in range(10_000):
        subject = f"{kind}:h5-{n}"
        if owner_port(nodes, state_key(Hit(rate_policy, subject))) == port:
            return subject
    raise AssertionError(f"no {kind} subject on port {port}")


def flush(nodes: list[RedisServer]) -> None:
    """Empty every master."""
    for node in nodes:
        with contextlib.closing(node.client()) as client:
            client.flushall()


def master_client(nodes: list[RedisServer], port: int) -> sync_redis.Redis:
    """Return a plain client on the master listening on `port`."""
    return next(n for n in nodes if n.port == port).client()


def rejected(node: sync_redis.Redis) -> Counter[str]:
    """Return how many commands of each kind `node` refused unexecuted (CLUSTERDOWN, MOVED...)."""
    stats = node.info("commandstats")
    return Counter(
        {name.removeprefix("cmdstat_"): int(entry.get("rejected_calls", 0)) for name, entry in stats.items()}
    )


@contextlib.contextmanager
def cluster_down_on(nodes: list[RedisServer], key: str) -> Iterator[sync_redis.Redis]:
    """Unassign `key`'s slot on its master: that master answers every keyed command with CLUSTERDOWN."""
    port = owner_port(nodes, key)
    slot = key_slot(key.encode())
    node = next(n for n in nodes if n.port == port).client()
    try:
        node.cluster("delslots", slot)
        # The master leaves the `ok` state in its next event-loop turn.
        wait_for_cluster_state(node, "fail")
        # The other masters still assign the slot to it: the topology clients read stays complete.
        with contextlib.closing(next(n for n in nodes if n.port != port).client()) as other:
            assert other.cluster("info")["cluster_state"] == "ok"
        yield node
    finally:
        node.cluster("addslots", slot)
        wait_for_cluster_state(node, "ok")
        node.close()


def wait_for_cluster_state(node: sync_redis.Redis, state: str) -> None:
    """Wait (up to 10 s) until `node` reports `state` as its cluster state."""
    deadline = time.monotonic() + 10
    while node.cluster("info")["cluster_state"] != state:
        assert time.monotonic() < deadline, f"the master never reported cluster_state {state}"
        time.sleep(0.01)  # condition wait: the node changes state in its next event-loop turn


def scripts_seen(node: sync_redis.Redis) -> int:
    """Return how many EVALSHA and EVAL commands `node` has received: executed, failed or refused."""
    stats = node.info("commandstats")
    return sum(
        int(entry["calls"]) + int(entry.get("rejected_calls", 0)) + int(entry.get("failed_calls", 0))
        for name, entry in stats.items()
        if name in ("cmdstat_evalsha", "cmdstat_eval")
    )


async def test_the_first_command_after_a_cluster_down_reply_goes_to_its_keys_master(
    cluster: RedisCluster, cluster_nodes: list[RedisServer]
) -> None:
    # After CLUSTERDOWN redis-py dropped its topology and routed the next command as if it had no key: to a
    # random master, the one that is down included (a refund after a failed check went there one time in three).
    limiter = RedisRateLimiter(cluster)
    ports = [node.port for node in cluster_nodes]
    generous = policy("user-history", limit=1000, period=60, burst=1000)
    down = Hit(generous, subject_on(cluster_nodes, ports[0], "user", generous))
    healthy = Hit(generous, subject_on(cluster_nodes, ports[1], "user", generous))
    assert (await limiter.acquire([down])).allowed and (await limiter.acquire([healthy])).allowed
    clients = [master_client(cluster_nodes, port) for port in ports]
    try:
        with cluster_down_on(cluster_nodes, state_key(down)):
            # Six rounds: a random master would be the right one in all of them once in 729 runs.
            for _ in range(6):
                with pytest.raises(RateLimiterUnavailable):
                    await asyncio.wait_for(limiter.acquire([down]), 5)
                before = [scripts_seen(client) for client in clients]
                assert (await asyncio.wait_for(limiter.acquire([healthy]), 5)).allowed
                seen = [scripts_seen(client) - count for client, count in zip(clients, before, strict=True)]
                assert seen == [0, 1, 0], seen  # the one EVALSHA went to the key's master, and only there
    finally:
        for client in clients:
            client.close()


# REDIS_TIMEOUT_MS for the tests below: twice the default, so that a loaded machine still re-reads the topology
# and reconnects (redis-py drops every connection after a CLUSTERDOWN) within one command's budget.
BUDGET = 0.2


async def lookup_once_recovered(
    ledger: RedisLedger, conversation_id: str, *, attempts: int
) -> LedgerEntry | None:
    """Return the ledger's entry for `conversation_id` from the first of `attempts` lookups that succeeds."""
    for _ in range(attempts - 1):
        try:
            return await ledger.lookup(conversation_id)
        except LedgerUnavailable:
            continue
    return await ledger.lookup(conversation_id)


async def budgeted_cluster(nodes: list[RedisServer]) -> Any:
    """Return a gateway Cluster client with the BUDGET, its topology read and a connection open to every master."""
    seed = f"redis://127.0.0.1:{nodes[0].port}"
    redis = create_redis(RedisTopology(url=seed, cluster=True), timeout=BUDGET)
    # Set-up, not under test: on a loaded machine one connect can stall past the 200 ms budget (a CI run failed
    # there, before its first assertion); each attempt is still bounded by it.
    try:
        async with asyncio.timeout(10):
            while True:
                try:
                    await redis.ping(target_nodes=RedisCluster.ALL_NODES)
                    return redis
                except REDIS_ERRORS:
                    await asyncio.sleep(0)
    except BaseException:
        await close_redis(redis)  # the caller's finally never gets the client
        raise


async def test_a_cluster_down_reply_is_one_attempt_bounded_by_the_redis_timeout(
    cluster: RedisCluster, cluster_nodes: list[RedisServer]
) -> None:
    # redis-py meets CLUSTERDOWN by closing every node's connections and sleeping 250 ms, and it retried: each
    # command cost 2 attempts and 500 ms against a 100 ms REDIS_TIMEOUT_MS, and the ledger has no breaker.
    redis = await budgeted_cluster(cluster_nodes)
    try:
        limiter = RedisRateLimiter(redis)
        ledger = RedisLedger(redis, ttl_days=1)
        hit = Hit(policy("user-history", limit=1000, period=60, burst=1000), "user:down")
        port = owner_port(cluster_nodes, state_key(hit))
        conversation = on_node(cluster_nodes, port, "conv_")
        assert owner_port(cluster_nodes, ledger_key(conversation)) == port
        entry = LedgerEntry("down", "agent_demo", 1_700_000_000)
        assert (await limiter.acquire([hit])).allowed  # topology, connections and script in place
        await ledger.record(conversation, entry)

        with cluster_down_on(cluster_nodes, state_key(hit)) as node:
            before = rejected(node)
            # Event-based deadlines, far above the bound: a hung command fails the test instead of hanging it.
            with pytest.raises(RateLimiterUnavailable):
                await asyncio.wait_for(limiter.acquire([hit]), 5)
            with pytest.raises(LedgerUnavailable):
                await asyncio.wait_for(ledger.record(conversation, entry), 5)
            with pytest.raises(LedgerUnavailable):
                await asyncio.wait_for(ledger.lookup(conversation), 5)
            # One attempt each at most (the retry made it two, each followed by a 250 ms sleep). The ledger's may
            # not reach the node at all: redis-py drops every connection after a CLUSTERDOWN, and on a loaded
            # machine re-reading the topology and reconnecting can use up the next command's budget first.
            seen = rejected(node) - before
            assert seen["evalsha"] == 1 and set(seen) <= {"evalsha", "set", "get"}, seen
            assert max(seen.values()) == 1, seen

            # Bounded by the budget, 12 lookups take about 12 x 200 ms; with 2 attempts and 2 x 250 ms of
            # sleep each they took over 6 s, more than the deadline.
            async def lookups() -> None:
                for _ in range(12):
                    with pytest.raises(LedgerUnavailable):
                        await ledger.lookup(conversation)

            before = rejected(node)
            await asyncio.wait_for(lookups(), 5)
            seen = rejected(node) - before
            assert set(seen) <= {"get"} and seen["get"] <= 12, seen

        # The master serves its slot again: the commands succeed again, no restart, no new client. The first one
        # re-reads the topology and reconnects, which on a loaded machine can use up its own budget (a run of the
        # whole suite did): a few attempts, each bounded by the budget.
        assert await lookup_once_recovered(ledger, conversation, attempts=5) == entry
        assert (await limiter.acquire([hit])).allowed
    finally:
        await close_redis(redis)


async def test_gateway_on_a_cluster_down_master_fails_closed_within_the_budget(
    cluster_nodes: list[RedisServer], emulator_url: str, tmp_path: pytest.TempPathFactory
) -> None:
    from tests.conftest import EMULATOR_API_KEY
    from tests.support.gateway import run_gateway

    config, seed = empty_cluster_config(cluster_nodes, tmp_path)
    user = "down-user"
    user_key = state_key(Hit(policy("user-history"), f"user:{user}"))
    port = owner_port(cluster_nodes, user_key)
    conversation = on_node(cluster_nodes, port, "conv_")
    assert owner_port(cluster_nodes, ledger_key(conversation)) == port
    for mode in ("closed", "local"):
        env = {
            "GATEWAY_CONFIG": str(config),
            "RATE_LIMIT_ON_REDIS_ERROR": mode,
            "REDIS_TIMEOUT_MS": str(int(BUDGET * 1000)),
        }
        async with run_gateway(emulator_url, EMULATOR_API_KEY, seed, env) as gw:
            path = f"/v1/convai/conversations/{conversation}"
            # Real JWTs; the first request warms the topology and the script.
            assert (await gw.client.get(path, headers=gw.headers(user))).status_code == 404
            with cluster_down_on(cluster_nodes, user_key) as master:
                before = rejected(master)
                refused = await asyncio.wait_for(gw.client.get(path, headers=gw.headers(user)), 5)
                seen = rejected(master) - before
            if mode == "closed":
                # The limiter follows RATE_LIMIT_ON_REDIS_ERROR: a 503, never a 500, after one attempt.
                assert refused.status_code == 503 and refused.json()["code"] == "rate_limiter_unavailable"
                assert seen == Counter({"evalsha": 1})
            else:
                # `local` limits in process; the ledger has no fallback and fails closed after one attempt at most
                # (none when the reconnect redis-py forces after a CLUSTERDOWN outlasts its budget).
                assert refused.status_code == 503 and refused.json()["code"] == "ledger_unavailable"
                assert seen["evalsha"] == 1 and set(seen) <= {"evalsha", "get"} and seen["get"] <= 1, seen


# ---------------------------------------------------------------------------------------------- errors in one slot


@contextlib.asynccontextmanager
async def asleep(port: int, seconds: float) -> AsyncIterator[None]:
    """Keep the node on `port` inside DEBUG SLEEP for the block, then wait until it answers again."""
    sleeper = await asyncio.to_thread(start_debug_sleep, port, seconds)
    try:
        yield
    finally:
        await asyncio.to_thread(sleeper.recv, 64)  # "+OK": the node is awake
        sleeper.close()


@contextlib.asynccontextmanager
async def outage(kind: str, nodes: list[RedisServer], key: str) -> AsyncIterator[None]:
    """Make the master serving `key` fail every command: asleep (a timeout) or `CLUSTERDOWN`."""
    if kind == "asleep":
        async with asleep(owner_port(nodes, key), 2.0):
            yield
    else:
        with cluster_down_on(nodes, key):
            yield


# Holds its master for ARGV[1] ms, then counts once: a command that is surely in flight for that long.
BUSY_INCR = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - start >= tonumber(ARGV[1]) * 1000
return redis.call('INCR', KEYS[1])
"""


async def test_a_cluster_down_reply_leaves_the_commands_in_flight_on_other_masters_intact(
    cluster_nodes: list[RedisServer],
) -> None:
    # redis-py meets CLUSTERDOWN by closing the whole client, in-use connections included: a command in flight
    # on a healthy master lost its reply, and its connection-error retry ran it a second time (a rate-limit
    # reservation made twice, or made and reported failed, so never refunded).
    flush(cluster_nodes)
    ports = [node.port for node in cluster_nodes]
    down_key, busy_key = on_node(cluster_nodes, ports[0], "down-"), on_node(cluster_nodes, ports[1], "busy-")
    redis = create_redis(RedisTopology(url=f"redis://127.0.0.1:{ports[0]}", cluster=True), timeout=5)
    busy_master = master_client(cluster_nodes, ports[1])
    threshold = str(busy_master.config_get("busy-reply-threshold")["busy-reply-threshold"])
    try:
        await redis.ping(target_nodes=RedisCluster.ALL_NODES)  # topology and connections in place
        # While a script runs past 10 ms, the master answers others BUSY: how the test sees it in flight.
        busy_master.config_set("busy-reply-threshold", 10)
        with cluster_down_on(cluster_nodes, down_key):
            counted = asyncio.create_task(redis.eval(BUSY_INCR, 1, busy_key, 1000))
            while True:  # condition wait, bounded by the script's own second
                try:
                    await asyncio.to_thread(busy_master.ping)
                except RedisError as busy:
                    assert "BUSY" in str(busy)
                    break
                assert not counted.done(), counted
            with pytest.raises(ClusterDownError):
                await redis.get(down_key)
            assert await asyncio.wait_for(counted, 5) == 1
        assert busy_master.get(busy_key) == "1"  # run once
    finally:
        busy_master.config_set("busy-reply-threshold", threshold)
        busy_master.close()
        await close_redis(redis)


@pytest.mark.parametrize("kind", ["asleep", "cluster-down"])
async def test_an_error_in_one_slot_refunds_the_reservation_of_the_other(
    kind: str, cluster_nodes: list[RedisServer]
) -> None:
    flush(cluster_nodes)
    redis = await budgeted_cluster(cluster_nodes)
    ports = [node.port for node in cluster_nodes]
    agent = Hit(AGENT, subject_on(cluster_nodes, ports[0], "agent", AGENT))
    user = Hit(USER, subject_on(cluster_nodes, ports[1], "user", USER))  # on another master
    healthy = master_client(cluster_nodes, ports[1])
    try:
        limiter = RedisRateLimiter(redis, clock=ManualClock())
        # Topology, connections and scripts in place on both masters; the user has 1 of its 2 left.
        assert (await limiter.acquire([user, agent])).allowed
        before = healthy.get(state_key(user))
        assert before is not None

        async with outage(kind, cluster_nodes, state_key(agent)):
            with pytest.raises(RateLimiterUnavailable) as failed:
                await asyncio.wait_for(limiter.acquire([user, agent]), 5)
            # The user's slot committed its reservation, then got it back: nothing was charged.
            assert healthy.get(state_key(user)) == before
        assert isinstance(failed.value.__cause__, TimeoutError | RedisError), failed.value.__cause__

        # The clock has not moved: the user's second unit is still there, and only it.
        assert (await limiter.acquire([user])).allowed
        assert not (await limiter.acquire([user])).allowed
    finally:
        healthy.close()
        await close_redis(redis)


async def test_a_denial_and_an_error_leave_the_committed_slot_refunded(
    cluster_nodes: list[RedisServer],
) -> None:
    # A route's hits span two subjects today; three slot groups exercise every combination in one request:
    # one denies, one fails, one commits.
    flush(cluster_nodes)
    redis = await budgeted_cluster(cluster_nodes)
    ports = [node.port for node in cluster_nodes]
    extra = policy("user-history", limit=10, period=60, burst=3)
    agent = Hit(AGENT, subject_on(cluster_nodes, ports[0], "agent", AGENT))
    denied = Hit(USER, subject_on(cluster_nodes, ports[1], "user", USER))
    committed = Hit(extra, subject_on(cluster_nodes, ports[2], "user", extra))
    clients = {port: master_client(cluster_nodes, port) for port in ports}
    try:
        limiter = RedisRateLimiter(redis, clock=ManualClock())
        assert (await limiter.acquire([denied, agent, committed])).allowed
        assert (await limiter.acquire([denied])).allowed  # the denied user's burst (2) is spent
        # Each hit's master is `ports[i]` for the hit at position i.
        placed = list(zip([agent, denied, committed], ports, strict=True))
        before = [clients[port].get(state_key(hit)) for hit, port in placed]
        assert None not in before

        async with asleep(ports[0], 2.0):
            with pytest.raises(RateLimiterUnavailable):
                await asyncio.wait_for(limiter.acquire([denied, agent, committed]), 5)
            # The denial stored nothing and the committed slot got its reservation back.
            assert [clients[port].get(state_key(hit)) for hit, port in placed[1:]] == before[1:]
        # The sleeping master ran the timed-out script when it woke: an outcome the gateway could not know stays
        # charged, since returning a unit that was never taken could admit more than the limit.
        deadline = time.monotonic() + 5
        while (after := clients[ports[0]].get(state_key(agent))) == before[0]:
            assert time.monotonic() < deadline, "the timed-out script never ran"
            await asyncio.sleep(0.01)
        assert after is not None and before[0] is not None
        assert float(after) == float(before[0]) + interval_us(AGENT)

        # Nothing was charged in the other slots: 2 of the 3 units of `committed` are left, 0 of `denied`'s.
        for _ in range(2):
            assert (await limiter.acquire([committed])).allowed
        assert not (await limiter.acquire([committed])).allowed
        assert not (await limiter.acquire([denied])).allowed
    finally:
        for client in clients.values():
            client.close()
        await close_redis(redis)


@dataclass
class SplitRequest:
    """A limiter on a 1 s Redis budget and a request whose user and agent keys live on two masters."""

    limiter: RedisRateLimiter
    user: Hit
    agent: Hit
    healthy: sync_redis.Redis  # the user key's master
    agent_port: int  # the agent key's master
    before: Any  # the user's stored state after one admitted request


@contextlib.asynccontextmanager
async def split_request(cluster_nodes: list[RedisServer]) -> AsyncIterator[SplitRequest]:
    """Yield a SplitRequest whose request has been admitted once; close its clients afterwards."""
    flush(cluster_nodes)
    seed = f"redis://127.0.0.1:{cluster_nodes[0].port}"
    redis = create_redis(RedisTopology(url=seed, cluster=True), timeout=1.0)
    ports = [node.port for node in cluster_nodes]
    agent = Hit(AGENT, subject_on(cluster_nodes, ports[0], "agent", AGENT))
    user = Hit(USER, subject_on(cluster_nodes, ports[1], "user", USER))
    healthy = master_client(cluster_nodes, ports[1])
    try:
        limiter = RedisRateLimiter(redis, clock=ManualClock())
        assert (await limiter.acquire([user, agent])).allowed
        yield SplitRequest(limiter, user, agent, healthy, ports[0], healthy.get(state_key(user)))
    finally:
        healthy.close()
        await close_redis(redis)


async def acquire_past_the_user_slot(split: SplitRequest) -> asyncio.Task[Decision]:
    """Start acquiring the split request; return the task once the user's slot has committed its reservation."""
    attempt = asyncio.create_task(split.limiter.acquire([split.user, split.agent]))
    # Condition wait: the user's key on its (healthy) master has moved on.
    deadline = time.monotonic() + 0.8
    while await asyncio.to_thread(split.healthy.get, state_key(split.user)) == split.before:
        assert time.monotonic() < deadline, "the user's slot never committed"
    return attempt


async def test_a_failed_refund_is_logged_and_the_original_error_raised(
    cluster_nodes: list[RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    # A long budget: the test pauses the healthy master between its commit and the other slot's timeout.
    async with split_request(cluster_nodes) as split:
        user, agent, healthy = split.user, split.agent, split.healthy
        caplog.set_level(logging.WARNING, logger="service.ratelimit")
        async with asleep(split.agent_port, 3.0):
            # The agent's slot is asleep and times out after 1 s.
            attempt = await acquire_past_the_user_slot(split)
            # Scripts that may write wait while the master is paused: the refund times out.
            await asyncio.to_thread(healthy.client_pause, 5000, False)
            try:
                with pytest.raises(RateLimiterUnavailable) as failed:
                    await asyncio.wait_for(attempt, 5)
            finally:
                await asyncio.to_thread(healthy.client_unpause)
        # The error is the agent slot's timeout, not the refund's; the refund's failure is a warning.
        assert isinstance(failed.value.__cause__, TimeoutError | RedisError), failed.value.__cause__
        warnings = [
            r for r in caplog.records if r.name == "service.ratelimit" and r.levelno == logging.WARNING
        ]
        assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
        message = warnings[0].getMessage()
        assert "refund" in message and user.subject not in message and agent.subject not in message, message
        assert warnings[0].exc_info is None


async def test_a_cancelled_cross_slot_acquire_stays_cancelled(cluster_nodes: list[RedisServer]) -> None:
    # Waiting for every slot group (to know which ones to refund) must not turn a cancellation (client gone,
    # request deadline) into an error or a decision.
    async with split_request(cluster_nodes) as split, asleep(split.agent_port, 2.0):
        # The agent's slot waits for its sleeping master.
        attempt = await acquire_past_the_user_slot(split)
        attempt.cancel()
        # Within the agent's 1 s budget at most: redis-py sends under Python 3.11's `wait_for`, which drops a
        # cancellation that arrives as the send completes, and the command then ends at its deadline.
        done, _ = await asyncio.wait({attempt}, timeout=5)
        assert attempt in done and attempt.cancelled(), attempt

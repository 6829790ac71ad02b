"""Build the process's one Redis client from `RedisTopology`: a URL, a Sentinel group, or a Cluster.

Every client gets a short time budget (socket timeouts; for pipelining clients, a deadline per batch) and
never retries a timeout: redis-py's default
retries a timed-out command three times with back-off, which would turn a 100 ms budget into seconds.
A connection error gets one immediate retry on a fresh connection (see `_retry_policy`). A Cluster client
also bounds each command as a whole by the timeout (`BudgetedRedisCluster`): redis-py waits on its own after
some replies (250 ms after CLUSTERDOWN), where no socket timeout applies, and reads the topology again before
routing a command once redis-py has dropped it. The rate limiter's circuit
breaker decides what happens when Redis is slow or gone; the ledger fails closed.
Clients connect lazily, so building one does not need a running event loop or a reachable server.
Standalone and Sentinel clients pipeline implicitly (`service.redis_pipeline`, `REDIS_PIPELINE_LIMIT`);
Cluster clients send commands one by one, since a batch there would have to be split per node.
A Sentinel client asks the sentinels which server is master at most every `SENTINEL_RECHECK_SECONDS`
(`FollowingSentinelPool`), not only when it opens a connection. Standalone and Sentinel pools hand out idle
connections without redis-py's per-checkout lock, metrics records and events (`QuickCheckoutPool`).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import Any, cast
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection, ConnectionPool, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisClusterException, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.maint_notifications import MaintNotificationsConfig

from service.redis_pipeline import DEFAULT_PIPELINE_LIMIT, PipeliningRedis
from service.settings import RedisTopology

# What a client built here (standalone, Sentinel or Cluster) raises when Redis is unusable: callers catch
# these and degrade (the limiter) or fail closed (the ledger); anything else is a bug.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError, TimeoutError)

logger = logging.getLogger("service.redis_client")

# Attribute on a Sentinel-backed client holding its Sentinel, so `close_redis` can close both.
_SENTINEL_ATTR = "_convai_sentinel"


def _retry_policy() -> Retry:
    # A pooled connection that went stale while Redis restarted is reconnected at checkout when the closure
    # has already reached it (`_CHECKED_CHECKOUTS`); one closed later fails its command with "Connection
    # closed by server", and without this retry each such connection would cost a failed request (three in a
    # row reopen the limiter's circuit). Timeouts are never retried (the budget holds); against a Redis that
    # is down both attempts are refused at once.
    return Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


def _timeouts(timeout: float, client_class: type[Redis] = Redis) -> dict[str, Any]:
    # A pipelining client bounds each whole batch instead (`PipeliningRedis.batch_timeout`): redis-py's
    # socket timeout would put every command's send under a task of its own.
    socket_timeout = None if issubclass(client_class, PipeliningRedis) else timeout
    return {"socket_timeout": socket_timeout, "socket_connect_timeout": timeout, "retry": _retry_policy()}


# Maintenance notifications off, as they are in effect anyway: they arrive as RESP3 pushes and the gateway
# speaks RESP2 (REDIS_URL cannot choose `protocol`). While they are "auto", which redis-py 8.1 gives a pool
# built from a URL, its checkout skips the check for a reply left unread on a pooled connection, and the next
# command, another request's, would read that reply as its own (a ledger GET, another conversation's owner).
_CHECKED_CHECKOUTS: dict[str, Any] = {"maint_notifications_config": MaintNotificationsConfig(enabled=False)}


# Replies are decoded as UTF-8 with bad bytes replaced: with "strict", one stored value that is not UTF-8
# raised UnicodeDecodeError (no RedisError, so a 500) and, inside an implicit pipeline, failed every other
# command of its batch. A replaced value simply fails its own parser (the ledger answers 503).
_DECODING: dict[str, Any] = {"decode_responses": True, "encoding_errors": "replace"}


# True while a BudgetedRedisCluster command runs in this task: redis-py's own `aclose` calls then come from its
# error handling, not from the client's owner.
_INSIDE_CLUSTER_COMMAND: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "inside_cluster_command", default=False
)


class BudgetedRedisCluster(RedisCluster):
    """A RedisCluster whose commands each end within `command_timeout`, retrying connection errors only."""

    # redis-py retries the exact types listed here whatever the Retry's supported_errors say. Not a timeout
    # (the budget would double), nor CLUSTERDOWN or an uncovered slot: redis-py meets each of those by
    # closing every node's connections and sleeping 250 ms, so one retry cost 500 ms and a topology refresh.
    ERRORS_ALLOW_RETRY = (RedisConnectionError,)  # type: ignore[assignment]

    # Seconds one command may take as a whole (set by `create_redis` to the Redis timeout; None: unbounded).
    # Socket timeouts bound each wait on a node, not the waits redis-py adds itself: the 250 ms sleep after
    # CLUSTERDOWN, 50 ms sleeps on TRYAGAIN, redirections and topology refreshes.
    command_timeout: float | None = None

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        """Run one command like RedisCluster; raise TimeoutError when it outlasts `command_timeout`."""
        inside = _INSIDE_CLUSTER_COMMAND.set(True)
        try:
            if self.command_timeout is None:
                return await self._routed(*args, **kwargs)
            async with asyncio.timeout(self.command_timeout):
                return await self._routed(*args, **kwargs)
        finally:
            _INSIDE_CLUSTER_COMMAND.reset(inside)

    async def aclose(self) -> None:
        """Close every node's connections; called by redis-py inside a command, only mark them for a refresh."""
        if not _INSIDE_CLUSTER_COMMAND.get():
            await super().aclose()
            return
        # redis-py closes the whole client to read the topology again after CLUSTERDOWN, an uncovered slot or
        # every few MOVED replies. That cut other requests' commands in flight on healthy nodes: a rate-limit
        # script that had reserved was reported failed (so never refunded), and its connection-error retry ran
        # it a second time. As redis-py does after a connection error: idle connections close now, busy ones
        # when their command ends, and the next command reads the topology first.
        self._initialize = True
        for node in list(self.nodes_manager.nodes_cache.values()):
            node.update_active_connections_for_reconnect()
            await node.disconnect_free_connections()

    async def _routed(self, *args: Any, **kwargs: Any) -> Any:
        # After a CLUSTERDOWN redis-py drops its topology, default node included, and routes the next command
        # before reading the topology again: without a default node it takes a keyed command for a keyless
        # one and sends it to a random master, maybe the one that is down (a refund after a failed rate-limit
        # check went there about once in three). Reading the topology first routes the command by its key.
        if self._initialize:
            await self.initialize()
        return await super().execute_command(*args, **kwargs)


def create_redis(
    topology: RedisTopology, *, timeout: float, pipeline_limit: int = DEFAULT_PIPELINE_LIMIT
) -> Any:
    """Return a redis.asyncio client (Redis, Sentinel master, or RedisCluster) for `topology`.

    `pipeline_limit` caps the commands per implicit pipeline; below 2 every command goes alone.
    """
    client_class: type[Redis] = PipeliningRedis if pipeline_limit >= 2 else Redis
    if topology.sentinels:
        client = _sentinel_master(topology, timeout, client_class)
    elif topology.url is None:
        raise ValueError("no Redis configured: set REDIS_URL or redis.sentinels")
    elif topology.cluster:
        # Cluster-level retries (MOVED/ASK redirections are followed regardless) stay off too.
        cluster = cast(
            BudgetedRedisCluster,
            BudgetedRedisCluster.from_url(topology.url, **_DECODING, **_timeouts(timeout)),
        )
        cluster.command_timeout = timeout
        return cluster
    else:
        pool = QuickCheckoutPool.from_url(
            topology.url, **_DECODING, **_CHECKED_CHECKOUTS, **_timeouts(timeout, client_class)
        )
        client = client_class.from_pool(pool)
    if isinstance(client, PipeliningRedis):
        client.pipeline_limit = pipeline_limit
        client.batch_timeout = timeout
    return client


class QuickCheckoutPool(ConnectionPool):
    """A connection pool that hands out and takes back idle connections without redis-py's bookkeeping."""

    # redis-py 8 wraps each checkout and return in an asyncio lock, four awaited observability records
    # (OpenTelemetry metrics, which the gateway never configures) and a connection-released event (heard only
    # by streaming credential providers, which no setting here creates): ~60 k instructions per Redis batch,
    # two batches per signed-url request. Taking and returning a connection are plain list operations with no
    # await between them, so on the event loop they are atomic without the lock; it matters only while
    # someone holds it across an await (redis-py's maintenance-notification and re-auth handlers), and then
    # both go redis-py's own way and wait. A checkout still goes through redis-py's `ensure_connection`:
    # it connects, and reconnects a connection holding unread bytes (`_CHECKED_CHECKOUTS`).

    async def get_connection(self, *args: Any, **options: Any) -> AbstractConnection:
        """Return a connected connection from the pool: redis-py's way when its lock is held."""
        if args or options or self._lock.locked():
            # Passed on as given: redis-py warns (deprecated) when a command name or keys are passed at all.
            held: AbstractConnection = await super().get_connection(*args, **options)  # type: ignore[no-untyped-call]
            return held
        connection: AbstractConnection = self.get_available_connection()  # type: ignore[no-untyped-call]
        try:
            await self.ensure_connection(connection)
        except BaseException:
            await self.release(connection)
            raise
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        """Return `connection` to the pool: redis-py's way when its lock is held or it must reconnect."""
        if self._lock.locked() or connection.should_reconnect():  # type: ignore[no-untyped-call]
            await super().release(connection)
            return
        self._in_use_connections.remove(connection)
        self._available_connections.append(connection)


# How often a Sentinel client asks the sentinels which server is master (one SENTINEL MASTERS per process).
SENTINEL_RECHECK_SECONDS = 0.5


class FollowingSentinelPool(QuickCheckoutPool, SentinelConnectionPool):
    """A Sentinel master pool that re-asks the sentinels for the master and leaves a demoted one at once."""

    # redis-py asks the sentinels only when it opens a connection, so after a switchover (the old master
    # alive, a replica promoted) pooled connections kept writing to the old master until the sentinel
    # demoted it, ~10 s later; its resync from the new master then discarded those writes (ledger entries
    # of signed URLs already handed out). A crashed master is left at once anyway: its connections fail.
    recheck_seconds = SENTINEL_RECHECK_SECONDS
    _checked_at = -float("inf")
    _recheck: asyncio.Task[None] | None = None
    # Whether the last background recheck found no master (logged once when it starts, once when it ends).
    _sentinels_failing = False

    async def get_connection(self, *args: Any, **options: Any) -> AbstractConnection:
        """Return a connection to the master, asking the sentinels in the background if the last answer is old."""
        now = time.monotonic()
        if self._recheck is None and now - self._checked_at >= self.recheck_seconds:
            # In the background: a sentinel that is slow or gone must not hold up a command the master
            # can serve. Connections handed out later compare against the answer (`ensure_connection`).
            self._checked_at = now
            self._recheck = asyncio.get_running_loop().create_task(self._ask_sentinels())
            # Cleared by a done-callback, not by the recheck itself: a task cancelled before its first step never
            # runs its body, and a recheck left set for good would stop this pool asking the sentinels again.
            self._recheck.add_done_callback(self._recheck_done)
        return await super().get_connection(*args, **options)

    async def _ask_sentinels(self) -> None:
        try:
            # Sets master_address and closes the idle connections when the master moved.
            await self.get_master_address()  # type: ignore[no-untyped-call]
        except REDIS_ERRORS as exc:
            # No master known right now: connecting asks again and fails its command if need be. While the
            # master itself answers, commands keep succeeding and nothing else would tell that a failover can
            # no longer be followed; said once, not every recheck. The error's type, or the reasons our
            # Sentinel gives (built from types too): an error's text may hold a sentinel's reply.
            if not self._sentinels_failing:
                self._sentinels_failing = True
                why = (
                    "; ".join(exc.reasons) if isinstance(exc, SentinelsFoundNoMaster) else type(exc).__name__
                )
                logger.warning(
                    "Redis Sentinel: no sentinel named the master of %r (%s); a failover would not be followed "
                    "until one does",
                    self.service_name,
                    why,
                )
        else:
            if self._sentinels_failing:
                self._sentinels_failing = False
                logger.info("Redis Sentinel: the sentinels name the master of %r again", self.service_name)

    def _recheck_done(self, task: asyncio.Task[None]) -> None:
        if self._recheck is task:
            self._recheck = None

    async def ensure_connection(self, connection: AbstractConnection) -> None:
        """Connect `connection`, first closing it if it is still open to a server no longer master."""
        # Connections in use while the master moved come back to the pool still open to the old one.
        address = (getattr(connection, "host", None), getattr(connection, "port", None))
        if (
            connection.is_connected
            and self.master_address is not None
            and address != tuple(self.master_address)
        ):
            await connection.disconnect()
        await super().ensure_connection(connection)

    async def stop_rechecking(self) -> None:
        """Cancel a sentinel query in flight (the client is closing)."""
        task = self._recheck
        if task is None:
            return
        caller = asyncio.current_task()
        # Counted before: close_redis may run in a task already being cancelled (a shutdown's cleanup).
        requested = caller.cancelling() if caller is not None else 0
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            # The recheck's own cancellation ends here. One requested of the caller while it waited arrives as
            # the same exception and must go on: it was suppressed too, and close_redis carried on uncancelled.
            if caller is not None and caller.cancelling() > requested:
                raise


class SentinelsFoundNoMaster(MasterNotFoundError):
    """No sentinel named a master; `reasons` says why, per sentinel, without any reply text or secret."""

    def __init__(self, service: str, reasons: list[str]) -> None:
        super().__init__(f"No master found for {service!r}: {'; '.join(reasons) or 'no sentinels'}")
        self.reasons = reasons


class ExplainingSentinel(Sentinel):
    """A Sentinel whose failure to find a master says why for each sentinel (refused credentials, TLS...)."""

    # Whether credentials are sent to the sentinels: a refusal then means wrong ones, else missing ones.
    authenticates = False

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        """Return the master's address as the first sentinel that knows a healthy one names it, or raise."""
        # As redis-py's, but each failure is kept as a reason built from the error's type alone: redis-py puts
        # each error's repr in MasterNotFoundError's text, where a sentinel's reply could show, and a reason
        # such as "authentication required" is what an operator needs to fix the configuration.
        reasons: list[str] = []
        for number, sentinel in enumerate(self.sentinels):
            kwargs = sentinel.connection_pool.connection_kwargs
            where = f"{kwargs.get('host')}:{kwargs.get('port')}"
            try:
                masters = await sentinel.sentinel_masters()
            except (RedisError, OSError) as exc:
                reasons.append(f"{where} {self._reason(exc)}")
                continue
            # A dict keyed by service name (RESP2 and RESP3 alike; redis-py's stubs allow a list too).
            state = cast(dict[str, Any], masters).get(service_name)
            if state and self.check_master_state(state, service_name):
                self.sentinels[0], self.sentinels[number] = sentinel, self.sentinels[0]
                return state["ip"], state["port"]
            reasons.append(f"{where} knows no healthy master of {service_name!r}")
        raise SentinelsFoundNoMaster(service_name, reasons)

    def _reason(self, exc: BaseException) -> str:
        if isinstance(exc, AuthenticationError):
            if self.authenticates:
                return "refused the credentials (AuthenticationError: check redis.sentinel_auth and the password)"
            return (
                "requires authentication (AuthenticationError: set redis.sentinel_auth and "
                "REDIS_SENTINEL_PASSWORD, or reuse REDIS_URL's)"
            )
        if isinstance(exc, ResponseError):
            # NOPERM from an ACL user without +sentinel, or ERR from a server that is no sentinel.
            return f"refused SENTINEL MASTERS ({type(exc).__name__}: is it a sentinel? check its user's ACL)"
        if isinstance(exc, (TimeoutError, RedisTimeoutError)):
            return f"did not answer in time ({type(exc).__name__})"
        return f"could not be asked ({type(exc).__name__}: unreachable, or TLS expected on one side only)"


def _sentinel_kwargs(topology: RedisTopology, timeout: float, url_kwargs: dict[str, Any]) -> dict[str, Any]:
    # Of REDIS_URL's options only the credentials (with "redis_url") and the TLS ones (with sentinel_tls) reach the
    # sentinels: a sentinel has no database (SELECT would fail each connection), and client_name,
    # max_connections... describe the master's connections.
    kwargs = _timeouts(timeout)
    if topology.sentinel_auth == "password" and topology.sentinel_password is not None:
        kwargs["password"] = topology.sentinel_password.reveal()
        if topology.sentinel_username:
            kwargs["username"] = topology.sentinel_username
    elif topology.sentinel_auth == "redis_url":
        kwargs.update({k: url_kwargs[k] for k in ("username", "password") if url_kwargs.get(k)})
    if topology.sentinel_tls:
        kwargs["ssl"] = True
        kwargs.update({k: v for k, v in url_kwargs.items() if k.startswith("ssl_")})
    return kwargs


def _sentinel_master(topology: RedisTopology, timeout: float, client_class: type[Redis]) -> Any:
    # A REDIS_URL given alongside says everything about the master but where it is (the sentinels name it):
    # credentials, database, TLS and every other supported option reach its connections, max_connections its
    # pool. Only credentials and the database used to be taken, the rest (client_name, ssl_*...) silently lost.
    url_kwargs: dict[str, Any] = {}
    if topology.url:
        url_kwargs.update(parse_url(topology.url))
        for where in ("host", "port", "path", "connection_class"):
            url_kwargs.pop(where, None)
    master_kwargs = dict(url_kwargs)
    if topology.url and urlsplit(topology.url).scheme == "rediss":
        # SentinelConnectionPool then connects with SentinelManagedSSLConnection, which takes the ssl_*.
        master_kwargs["ssl"] = True
    # Settings refuse the URL options the gateway sets; applied last, the gateway's win regardless.
    master_kwargs.update({**_DECODING, **_CHECKED_CHECKOUTS, **_timeouts(timeout, client_class)})
    sentinel_kwargs = _sentinel_kwargs(topology, timeout, url_kwargs)
    sentinel = ExplainingSentinel(list(topology.sentinels), sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    sentinel.authenticates = "password" in sentinel_kwargs
    client = sentinel.master_for(
        topology.sentinel_service or "mymaster",
        redis_class=client_class,
        connection_pool_class=FollowingSentinelPool,
        **master_kwargs,
    )
    setattr(client, _SENTINEL_ATTR, sentinel)
    return client


async def close_redis(client: Any) -> None:
    """Close a client built by `create_redis`, its connection pool and any Sentinel connections."""
    try:
        pool = getattr(client, "connection_pool", None)
        if isinstance(pool, FollowingSentinelPool):
            await pool.stop_rechecking()
        if isinstance(client, RedisCluster):
            # RedisCluster.aclose closes nothing while a topology refresh is pending, i.e. after any
            # connection error or timeout: every node's sockets would be left open.
            await client.nodes_manager.aclose()
            await client.nodes_manager.aclose("startup_nodes")
        await client.aclose()
    finally:
        sentinel = getattr(client, _SENTINEL_ATTR, None)
        if sentinel is not None:
            await sentinel.aclose()

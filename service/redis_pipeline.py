"""Implicit pipelining: the Redis commands issued in one event-loop turn reach Redis as one pipeline.

Under load, many requests reach their Redis step (the rate-limit EVALSHA, the ledger SET or GET) in the same
turn of the event loop. Sent one by one, each command costs redis-py a pooled connection, a socket write, a
read wake-up and 50-100 us of client CPU; sent together they share all of that. envoyproxy/ratelimit calls
this implicit pipelining (`REDIS_PIPELINE_WINDOW`, `REDIS_PIPELINE_LIMIT`). Nothing here waits for a batch
to fill: a batch's task is created with its first command and sends, on the next loop turn, every command
issued until then (at most `pipeline_limit`), so a lone command pays one extra loop turn each way and no timer.

What each command keeps: its own reply or its own command error (a NOSCRIPT reaches only the script's
caller, never its neighbours; an argument that cannot be encoded fails its caller before it is queued). A
connection error or a timeout fails every command of its batch, as it would have failed each of them on that
connection; the client's retry policy retries the batch like a single command.

The time budget: a whole batch (waiting for a pooled connection, connecting, sending, the one retry and
every reply) must finish within `batch_timeout`, or each of its callers gets redis-py's TimeoutError and the
connection is dropped. The builder sets it to the Redis budget and turns redis-py's per-socket-operation
timeout off for these clients: with it on, redis-py sends every command under `asyncio.wait_for`, which on
Python 3.11 starts a task per command (~100 k instructions per command; ~80 k per gateway request).
Consequently `pipeline()` (MULTI/WATCH) and `pubsub()`, which bypass `execute_command`, carry no deadline
of their own here: wrap them in `asyncio.timeout`. Blocking commands (BLPOP...) must not be sent through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

DEFAULT_PIPELINE_LIMIT = 100

# (command arguments, redis-py options, the future its caller awaits)
_Queued = tuple[tuple[Any, ...], dict[str, Any], "asyncio.Future[Any]"]


class PipeliningRedis(Redis):
    """A redis.asyncio client that sends the commands of one event-loop turn as one pipeline."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Set by the builder (`service.redis_client`) right after construction: redis-py's `from_url` and
        # Sentinel's `master_for` pass their keyword arguments to the connection pool, not to the client.
        self.pipeline_limit = DEFAULT_PIPELINE_LIMIT
        self.batch_timeout: float | None = None  # seconds; None = no deadline
        # The open batch: commands queued since its task was created, which takes them when it first runs.
        self._queued: list[_Queued] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        self._encoder = self.connection_pool.get_encoder()  # type: ignore[no-untyped-call]
        pool = self.connection_pool
        if not issubclass(pool.connection_class, HiredisPacking):
            pool.connection_class = _packing_with_hiredis(pool.connection_class)

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        """Queue a command for this loop turn's pipeline and return its reply (or raise its error)."""
        # An argument redis-py cannot encode (None, a bool, a dict) raises DataError here, for its own caller:
        # raised while the batch was packed, it failed every other command of the batch too.
        for arg in args:
            if not isinstance(arg, str | bytes):
                self._encoder.encode(arg)
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        batch = self._queued
        batch.append((args, options, reply))
        if len(batch) == 1:
            # The batch's task starts on the next loop turn, after every command of this turn has joined it.
            # Created here rather than from a `call_soon` callback, which would cost a lone command one more
            # loop turn (a pass of the loop and an epoll_wait) on its way out.
            task = loop.create_task(self._send(batch))
            # The loop keeps only weak references to tasks: hold each batch until it is done.
            self._in_flight.add(task)
            task.add_done_callback(functools.partial(self._batch_done, batch))
        if len(batch) >= self.pipeline_limit:
            self._queued = []
        return await reply

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        """Wait for the queued commands and the batches in flight (each has its task), then close the client."""
        # Only the unfinished ones: a finished batch leaves `_in_flight` by a done-callback, on a later loop
        # turn, and from Python 3.12 on `gather` of tasks that are all done completes without yielding, so
        # waiting on `_in_flight` itself spun for ever (the callback never got its turn) at 100 % CPU.
        while unfinished := [task for task in self._in_flight if not task.done()]:
            await asyncio.gather(*unfinished, return_exceptions=True)
        await super().aclose(close_connection_pool)

    def _batch_done(self, batch: list[_Queued], task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if task.cancelled():
            # Cancelled while sending or before its first step (then with its batch still open): its callers
            # are cancelled with it, none may wait forever.
            if self._queued is batch:
                self._queued = []
            for _, _, reply in batch:
                reply.cancel()

    async def _send(self, batch: list[_Queued]) -> None:
        if self._queued is batch:
            self._queued = []  # closed: commands from now on form the next batch
        try:
            async with asyncio.timeout(self.batch_timeout):
                if len(batch) == 1:
                    # A lone command goes out as itself: a one-command pipeline would only cost more.
                    args, options, reply = batch[0]
                    results: list[Any] = [await super().execute_command(*args, **options)]  # type: ignore[no-untyped-call]
                else:
                    pipe = self.pipeline(transaction=False)
                    for args, options, _ in batch:
                        pipe.execute_command(*args, **options)
                    results = await pipe.execute(raise_on_error=False)
        except TimeoutError:
            # asyncio's deadline, not redis-py's: callers see the error type a socket timeout gave them.
            error = RedisTimeoutError(f"Redis did not answer within {self.batch_timeout} s")
            for _, _, reply in batch:
                if not reply.done():
                    reply.set_exception(error)
            return
        except Exception as exc:
            # Every caller of the batch sees the one error, as every awaiter of a failed gather does.
            for _, _, reply in batch:
                if not reply.done():
                    reply.set_exception(exc)
            return
        for (_, _, reply), result in zip(batch, results, strict=True):
            # A caller cancelled meanwhile (its client went away) simply drops its reply.
            if reply.done():
                continue
            if isinstance(result, ResponseError):
                reply.set_exception(result)
            else:
                reply.set_result(result)


class HiredisPacking:
    """Pack commands with hiredis's C packer, as redis-py's synchronous client does; redis-py's own otherwise."""

    def pack_command(self, *args: Any) -> list[bytes]:
        """Return the RESP bytes of one command."""
        # redis-py's Python packer costs ~8 k instructions per argument: ~250 k for a list page's 30-key MGET
        # (6 % of a list request). Left to redis-py, so packed exactly as before: a command name with a space
        # (`SCRIPT LOAD`, split by redis-py), and what hiredis refuses (a bool or None, redis-py's DataError; a
        # lone surrogate, which the client's `encoding_errors="replace"` replaces).
        command = args[0]
        if isinstance(command, str) and " " not in command:
            with contextlib.suppress(TypeError, UnicodeEncodeError):
                return [hiredis.pack_command(args)]
        packed: list[bytes] = super().pack_command(*args)  # type: ignore[misc]
        return packed


def _packing_with_hiredis(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    # A subclass of whichever class the pool connects with (TCP, TLS, Unix socket, Sentinel-managed).
    return type(connection_class.__name__, (HiredisPacking, connection_class), {})

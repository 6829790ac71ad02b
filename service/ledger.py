"""The ownership ledger: which user a minted conversation belongs to (DESIGN section 3).

When the gateway mints a signed URL it records `conversation_id -> {user, agent_id, minted_at}`; the
conversation routes consult it before granting access. Two implementations share the `Ledger` protocol:

- `RedisLedger`: one Redis string per conversation, `ledger:{<conversation_id>}` (the braces are a Redis
  Cluster hash tag, so every key of one conversation sits in one slot), holding compact JSON
  `{"user": ..., "agent_id": ..., "minted_at": ...}` written with `SET ... EX` (atomic, one round trip,
  the TTL set together with the value). Redis errors become `LedgerUnavailable` (503): callers fail closed.
- `InProcessLedger`: a bounded, TTL-aware dict for a single replica without `REDIS_URL`.

This module imports no metrics: callers observe the outcome of a write themselves.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio.cluster import RedisCluster

from service.compact_json import NotPlainJson, plain_json
from service.errors import ServiceUnavailable
from service.redis_client import REDIS_ERRORS
from service.settings import Settings

logger = logging.getLogger("service.ledger")

KEY_PREFIX = "ledger:"
SECONDS_PER_DAY = 86_400


class LedgerUnavailable(ServiceUnavailable):
    """The ownership ledger cannot be read or written; the request fails closed with 503."""

    code = "ledger_unavailable"

    def __init__(self, detail: str = "ownership ledger unavailable") -> None:
        super().__init__(detail)


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """Who minted a conversation, for which agent, and when (unix seconds)."""

    user_id: str
    agent_id: str
    minted_at: int


class Ledger(Protocol):
    """Where conversation ownership is recorded and looked up."""

    async def record(self, conversation_id: str, entry: LedgerEntry) -> None:
        """Record (or replace) the owner of `conversation_id`."""
        ...

    async def lookup(self, conversation_id: str) -> LedgerEntry | None:
        """Return the entry for `conversation_id`, or None when the ledger does not know it."""
        ...

    async def lookup_many(self, conversation_ids: Sequence[str]) -> dict[str, LedgerEntry]:
        """Return the known entries among `conversation_ids` (unknown ids are absent from the result)."""
        ...

    async def remove(self, conversation_id: str) -> None:
        """Forget `conversation_id` (no error when it is unknown)."""
        ...

    async def ping(self) -> bool:
        """Tell whether the ledger's storage answers."""
        ...


def ledger_key(conversation_id: str) -> str:
    """Return the Redis key holding the entry of `conversation_id`."""
    return f"{KEY_PREFIX}{{{conversation_id}}}"


def encode_entry(entry: LedgerEntry) -> str:
    """Serialize an entry to the compact JSON stored in Redis."""
    fields = {"user": entry.user_id, "agent_id": entry.agent_id, "minted_at": entry.minted_at}
    try:
        # json.dumps with options builds an encoder per call: ~0.6 % of a signed-url request.
        return plain_json(fields).decode()
    except NotPlainJson:  # a lone surrogate in a token's `sub` (a JSON escape can carry one): escaped
        return json.dumps(fields, separators=(",", ":"))


# A list page decodes one entry per row (30 by default): json.loads' wrappers around the C scanner cost a
# third of each decode, so the scanner is called directly and the end checked here.
_ENTRY_DECODER = json.JSONDecoder()
# A user's list shows the same conversations page after page and reload after reload, and a decode costs
# ~16 k instructions (11 % of a list request) against ~0.5 k for a hit. The key is the stored bytes, so a hit
# is exactly the decode of those bytes (the entry is immutable); bounded: ~2 MB at most.
_DECODED_ENTRIES = 4096


@functools.lru_cache(maxsize=_DECODED_ENTRIES)
def decode_entry(raw: str | bytes) -> LedgerEntry:
    """Parse a stored entry, or raise LedgerUnavailable when it is not one (fail closed, never guess)."""
    # lru_cache keeps no exception: an unreadable entry is refused every time it is read.
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        data, end = _ENTRY_DECODER.raw_decode(text)
        if end != len(text):
            raise ValueError("data after the entry")
        user, agent, minted_at = data["user"], data["agent_id"], data["minted_at"]
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise LedgerUnavailable("ownership ledger entry unreadable") from exc
    # Exact types: a JSON `true` is a Python bool, which isinstance(..., int) would take for a time.
    if not (type(user) is str and type(agent) is str and type(minted_at) is int):
        raise LedgerUnavailable("ownership ledger entry unreadable")
    return LedgerEntry(user, agent, minted_at)


class RedisLedger:
    """The ledger in Redis (standalone, Sentinel or Cluster), one key per conversation with a TTL."""

    def __init__(self, redis: Any, *, ttl_days: int) -> None:
        if ttl_days < 1:
            raise ValueError("ttl_days must be at least 1")
        self._redis = redis
        self._cluster = isinstance(redis, RedisCluster)
        self._ttl_seconds = ttl_days * SECONDS_PER_DAY

    @property
    def ttl_seconds(self) -> int:
        """Return the lifetime of an entry in seconds."""
        return self._ttl_seconds

    async def record(self, conversation_id: str, entry: LedgerEntry) -> None:
        """Record the owner of `conversation_id` with the ledger TTL, in one atomic command."""
        try:
            # What `set(key, value, ex=ttl)` sends, without redis-py 8.1's work around it on every call (its
            # experimental-argument check and option parsing, ~30 k instructions: 1.5 % of a signed-url request).
            await self._redis.execute_command(
                "SET", ledger_key(conversation_id), encode_entry(entry), "EX", self._ttl_seconds
            )
        except REDIS_ERRORS as exc:
            logger.warning("ledger write failed: %s", type(exc).__name__)
            raise LedgerUnavailable() from exc

    async def lookup(self, conversation_id: str) -> LedgerEntry | None:
        """Return the entry for `conversation_id`, or None."""
        try:
            raw = await self._redis.get(ledger_key(conversation_id))
        except REDIS_ERRORS as exc:
            logger.warning("ledger read failed: %s", type(exc).__name__)
            raise LedgerUnavailable() from exc
        return None if raw is None else decode_entry(raw)

    async def lookup_many(self, conversation_ids: Sequence[str]) -> dict[str, LedgerEntry]:
        """Return the known entries among `conversation_ids`, in one pipelined round trip per node."""
        unique = list(dict.fromkeys(conversation_ids))
        if not unique:
            return {}
        try:
            if self._cluster:
                # Concurrent GETs rather than MGET (the keys hash to different slots) or a cluster pipeline:
                # redis-py's cluster pipeline retries a timeout after closing every node's connections and
                # sleeping 250 ms, which would break the Redis time budget for every request in flight.
                values = await asyncio.gather(
                    *(self._redis.get(ledger_key(conversation_id)) for conversation_id in unique)
                )
            else:
                # One command and one reply: for a page of 30 rows about 3x less client CPU than 30 GETs.
                # ledger_key's format, spelled out: 30 function calls cost ~15 k instructions per list page.
                values = await self._redis.mget([f"{KEY_PREFIX}{{{cid}}}" for cid in unique])
        except REDIS_ERRORS as exc:
            logger.warning("ledger read failed: %s", type(exc).__name__)
            raise LedgerUnavailable() from exc
        return {cid: decode_entry(raw) for cid, raw in zip(unique, values, strict=True) if raw is not None}

    async def remove(self, conversation_id: str) -> None:
        """Delete the entry of `conversation_id`."""
        try:
            await self._redis.delete(ledger_key(conversation_id))
        except REDIS_ERRORS as exc:
            logger.warning("ledger delete failed: %s", type(exc).__name__)
            raise LedgerUnavailable() from exc

    async def ping(self) -> bool:
        """Tell whether Redis answers PING."""
        try:
            return bool(await self._redis.ping())
        except REDIS_ERRORS:
            return False


class InProcessLedger:
    """A bounded in-memory ledger with TTLs, for a single replica running without Redis.

    Entries are kept in insertion order; as every entry has the same TTL, the oldest is also the first to
    expire, so expired entries are purged from the front and, when full, the oldest entry is evicted.
    An evicted or expired conversation is simply unknown to the ledger again.
    """

    def __init__(
        self, *, ttl_days: int, clock: Callable[[], float] = time.time, max_entries: int = 1_000_000
    ) -> None:
        if ttl_days < 1:
            raise ValueError("ttl_days must be at least 1")
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._ttl_seconds = ttl_days * SECONDS_PER_DAY
        self._clock = clock
        self._max_entries = max_entries
        self._entries: OrderedDict[str, tuple[LedgerEntry, float]] = OrderedDict()

    @property
    def ttl_seconds(self) -> int:
        """Return the lifetime of an entry in seconds."""
        return self._ttl_seconds

    def __len__(self) -> int:
        return len(self._entries)

    async def record(self, conversation_id: str, entry: LedgerEntry) -> None:
        """Record the owner of `conversation_id`, evicting expired and, if full, the oldest entries."""
        now = self._clock()
        self._purge_expired(now)
        self._entries.pop(conversation_id, None)
        while len(self._entries) >= self._max_entries:
            self._entries.popitem(last=False)
        self._entries[conversation_id] = (entry, now + self._ttl_seconds)

    async def lookup(self, conversation_id: str) -> LedgerEntry | None:
        """Return the live entry for `conversation_id`, or None."""
        return self._live(conversation_id, self._clock())

    async def lookup_many(self, conversation_ids: Sequence[str]) -> dict[str, LedgerEntry]:
        """Return the live entries among `conversation_ids`."""
        now = self._clock()
        found: dict[str, LedgerEntry] = {}
        for conversation_id in conversation_ids:
            entry = self._live(conversation_id, now)
            if entry is not None:
                found[conversation_id] = entry
        return found

    async def remove(self, conversation_id: str) -> None:
        """Forget `conversation_id`."""
        self._entries.pop(conversation_id, None)

    async def ping(self) -> bool:
        """Answer True: memory is always there."""
        return True

    def _live(self, conversation_id: str, now: float) -> LedgerEntry | None:
        item = self._entries.get(conversation_id)
        if item is None:
            return None
        entry, expires_at = item
        if expires_at <= now:
            del self._entries[conversation_id]
            return None
        return entry

    def _purge_expired(self, now: float) -> None:
        while self._entries:
            _, (_, expires_at) = next(iter(self._entries.items()))
            if expires_at > now:
                return
            self._entries.popitem(last=False)


def build_ledger(settings: Settings, redis: Any | None) -> Ledger:
    """Return the Redis ledger when a Redis client is given, else the in-process one (no REDIS_URL)."""
    if redis is not None:
        return RedisLedger(redis, ttl_days=settings.ledger_ttl_days)
    if settings.redis.configured:
        # Falling back silently would give each replica its own ledger and break ownership checks.
        raise ValueError("Redis is configured but no Redis client was given to build_ledger")
    return InProcessLedger(ttl_days=settings.ledger_ttl_days)

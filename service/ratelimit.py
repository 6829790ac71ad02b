"""Rate limits (DESIGN section 5): GCRA, exact under concurrency, one Redis round trip, alive without Redis.

Algorithm (GCRA, the "generic cell rate algorithm"). Each (policy, subject) pair keeps one number, the
theoretical arrival time TAT. With emission interval T = period / limit and `burst` B requests admitted
at once, a request at `now` is admitted when `max(TAT, now) + T - B*T <= now`, and then
`TAT := max(TAT, now) + T`. The state is a single float with a TTL (it expires when it no longer
differs from "fresh"), there are no window boundaries to burst across, and `remaining`, `reset_after`
and `retry_after` fall out of the same arithmetic. All times are microseconds, in Redis and in memory.

Redis (`RedisRateLimiter`): one Lua script (`EVALSHA`, reloaded with `EVAL` on `NOSCRIPT`) receives every
policy key of a request, evaluates them all, and writes the new TATs only when no enforced policy
rejects: all-or-nothing, and a rejected request changes no stored state. Scripts run atomically in
Redis, so N concurrent requests at a limit of K admit exactly K, across any number of gateway processes.
The clock is Redis `TIME` (one clock shared by every process) unless a `clock` is injected (tests).

Keys are `rl:{<subject>}:<policy>`; the braces are a Redis Cluster hash tag, so all keys of one subject
share a slot. A session mint checks `user-session` (subject `user:<id>`) and `agent-session`
(subject `agent:<id>`), which may live in different Cluster slots. Standalone and Sentinel: every key of
a request goes to one script call (any keys may be used together). Cluster: the keys are grouped by slot
and each group runs the same script (reserve: evaluate the group, commit it if it allows); the groups run
concurrently and, if any group rejects, the groups that committed are refunded by a second script
(TAT -= T per committed key). Each group is atomic, so no policy ever admits more than its limit; the
only imprecision is the conservative one: during the refund round trip a concurrent request may be
rejected by a reservation that is then returned. If a group fails instead (a Redis error or timeout), every
group still runs to its end, the ones that committed are refunded best effort (a failed refund is logged),
and the group's error is raised for the breaker below: a partial Cluster outage must not charge users for
requests Redis did not admit. A group that timed out may still have run; it is not refunded, since
returning a unit that was never taken could exceed the limit. A cancelled request (client gone, deadline)
stops at once, like a standalone one whose script already ran: what committed stays committed. Retagging
both keys with one subject would be wrong: the per-agent budget is global across users, so its key must
not depend on the user.

Redis failure (`ResilientRateLimiter`): Redis errors and timeouts (short socket timeouts, no retries, see
`service.redis_client`) feed a `CircuitBreaker`; while it is open Redis is not called, and after a
cooldown one probe request tries again, closing the circuit when it succeeds (recovery without restart).
`RATE_LIMIT_ON_REDIS_ERROR` picks what a request gets meanwhile: `local` (an in-process GCRA with the same
policies; per process, so N replicas admit up to N times the limit), `open` (allow), `closed` (503).
In every mode failed authentications are still counted, in process (`IpAuthFailureGuard`). A Redis outage
never yields a 500.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import NoScriptError

from service.client_ip import DEFAULT_IPV6_PREFIX, client_block, client_ip
from service.errors import GatewayError, RateLimited, ServiceUnavailable
from service.redis_client import REDIS_ERRORS
from service.settings import IPNetwork, RateLimitPolicy, RedisErrorMode, Settings

logger = logging.getLogger("service.ratelimit")

Observe = Callable[[str, str], None]
Clock = Callable[[], float]

KEY_PREFIX = "rl:"
MICROS = 1_000_000
# Float slack at exact boundaries: TATs near 1.7e15 us have a resolution of 0.25 us.
EPSILON_US = 1.0
NEAR_LIMIT_FRACTION = 0.1
MAX_SUBJECT_CHARS = 128

ROUTE_POLICIES: Mapping[str, tuple[str, ...]] = {
    "session": ("user-session", "agent-session"),
    "history": ("user-history",),
    "feedback": ("user-feedback",),
    "delete": ("user-delete",),
}

# Both scripts start here: `now` in microseconds is ARGV[1], or Redis TIME when ARGV[1] is "" (one clock for
# every gateway process).
_LUA_NOW = """
if redis.replicate_commands then redis.replicate_commands() end
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[1])
end
"""

# KEYS: one GCRA key per policy. ARGV[1]: now in microseconds, or "" to use Redis TIME.
# ARGV[2+3(i-1) ..]: emission interval (us), burst, shadow ("1"/"0") of policy i.
# Reply: {all_allowed, then per policy: allowed, remaining, reset_after_us, retry_after_us}. Floats are
# returned as strings because Redis truncates Lua numbers to integers.
ACQUIRE_SCRIPT = (
    _LUA_NOW
    + """
local eps = 1.0
local out = {1}
local new_tats = {}
local blocked = false
for i = 1, #KEYS do
  local base = 2 + (i - 1) * 3
  local interval = tonumber(ARGV[base])
  local burst = tonumber(ARGV[base + 1])
  local shadow = ARGV[base + 2] == '1'
  -- pcall: a key of another type (WRONGTYPE) is one subject's bad state, not a Redis outage; like a value
  -- that is no number, it counts as fresh and the SET below replaces it.
  local stored = redis.pcall('GET', KEYS[i])
  local tat = (type(stored) == 'string' and tonumber(stored)) or now
  if tat < now then tat = now end
  local new_tat = tat + interval
  local diff = now - (new_tat - burst * interval)
  if diff >= -eps then
    new_tats[i] = new_tat
    out[#out + 1] = 1
    out[#out + 1] = math.floor((diff + eps) / interval)
    out[#out + 1] = string.format('%.17g', new_tat - now)
    out[#out + 1] = '0'
  else
    new_tats[i] = false
    if not shadow then blocked = true end
    out[#out + 1] = 0
    out[#out + 1] = 0
    out[#out + 1] = string.format('%.17g', tat - now)
    out[#out + 1] = string.format('%.17g', -diff)
  end
end
if blocked then
  out[1] = 0
else
  for i = 1, #KEYS do
    if new_tats[i] then
      local ttl = math.ceil((new_tats[i] - now) / 1000)
      if ttl < 1 then ttl = 1 end
      redis.call('SET', KEYS[i], string.format('%.17g', new_tats[i]), 'PX', ttl)
    end
  end
end
return out
"""
)

# Returns one admitted request per key (Cluster only: undoes a reservation of a request another slot
# rejected). KEYS: keys to refund. ARGV[1]: now (us) or "". ARGV[1+i]: emission interval of key i.
REFUND_SCRIPT = (
    _LUA_NOW
    + """
for i = 1, #KEYS do
  local stored = redis.pcall('GET', KEYS[i])
  local tat = type(stored) == 'string' and tonumber(stored)
  if tat then
    local new_tat = tat - tonumber(ARGV[1 + i])
    if new_tat <= now then
      redis.call('DEL', KEYS[i])
    else
      local ttl = math.ceil((new_tat - now) / 1000)
      if ttl < 1 then ttl = 1 end
      redis.call('SET', KEYS[i], string.format('%.17g', new_tat), 'PX', ttl)
    end
  end
end
return #KEYS
"""
)


# ---------------------------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Hit:
    """One request against one policy for one subject (`user:alice`, `agent:agent_x`, `ip:203.0.113.9`)."""

    policy: RateLimitPolicy
    subject: str


@dataclass(frozen=True, slots=True)
class PolicyResult:
    """The verdict of one policy: whether it admits the request, what is left, and the times in seconds."""

    policy: RateLimitPolicy
    allowed: bool
    remaining: int
    reset_after: float  # until the policy's full burst is available again
    retry_after: float  # until this request would be admitted (0 when allowed)


@dataclass(frozen=True, slots=True)
class Decision:
    """The combined verdict of every policy of one request."""

    allowed: bool  # False only if a non-shadow policy rejected
    results: tuple[PolicyResult, ...]

    @property
    def rejected_by(self) -> tuple[PolicyResult, ...]:
        """Return the enforced (non-shadow) policies that rejected the request."""
        return tuple(r for r in self.results if not r.allowed and not r.policy.shadow)

    @property
    def retry_after(self) -> int:
        """Return the whole seconds to wait before retrying (0 when allowed, else at least 1)."""
        rejected = self.rejected_by
        if not rejected:
            return 0
        return max(1, math.ceil(max(r.retry_after for r in rejected)))

    def headers(self) -> dict[str, str]:
        """Return `RateLimit-Policy` and `RateLimit` (structured fields), plus `Retry-After` when rejected."""
        enforced = [r for r in self.results if not r.policy.shadow]
        if not enforced:
            return {}
        headers = {
            "RateLimit-Policy": ", ".join([_policy_item(r.policy) for r in enforced]),
            "RateLimit": ", ".join(
                f"{_sf_string(r.policy.name)};r={max(0, r.remaining)};t={max(0, math.ceil(r.reset_after))}"
                for r in enforced
            ),
        }
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after)
        return headers


# Both caches hold one entry per configured policy: rendering names char by char on every request was
# ~5 % of a mint's CPU (tests/perf/profile.py).
@functools.lru_cache(maxsize=64)
def _policy_item(policy: RateLimitPolicy) -> str:
    return f"{_sf_string(policy.name)};q={policy.limit};w={max(1, math.ceil(policy.period_seconds))}"


@functools.lru_cache(maxsize=64)
def _sf_string(value: str) -> str:
    # RFC 8941 sf-string: printable ASCII with '"' and '\' escaped.
    cleaned = "".join(c for c in value if 0x20 <= ord(c) <= 0x7E)
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


ALLOW_ALL = Decision(True, ())
# What `ResilientRateLimiter` answers in `open` mode while Redis cannot be asked: allowed, and nothing counted.
# Equal to ALLOW_ALL, so every caller treats it exactly alike; a distinct object, so a caller that must not go
# uncounted (the failed-authentication guard) can tell it apart by identity. ALLOW_ALL itself is no such
# signal: it also answers an empty list of hits, and a stand-in limiter may return it for everything.
UNCOUNTED = Decision(True, ())


def state_key(hit: Hit) -> str:
    """Return the Redis key of a hit: `rl:{<subject>}:<policy>` (the braces are the Cluster hash tag)."""
    subject = hit.subject
    # Braces would move the hash tag and long ids would bloat keys: such subjects are hashed.
    if "{" in subject or "}" in subject or len(subject) > MAX_SUBJECT_CHARS:
        subject = "sha256:" + hashlib.sha256(subject.encode()).hexdigest()[:32]
    return f"{KEY_PREFIX}{{{subject}}}:{hit.policy.name}"


def interval_us(policy: RateLimitPolicy) -> float:
    """Return the policy's emission interval T = period / limit, in microseconds."""
    return policy.period_seconds * MICROS / policy.limit


def _unique(hits: Sequence[Hit]) -> list[Hit]:
    # The same key twice in one script would read a stale TAT for its second copy.
    seen: set[tuple[str, str]] = set()
    unique = []
    for hit in hits:
        marker = (hit.policy.name, hit.subject)
        if marker not in seen:
            seen.add(marker)
            unique.append(hit)
    return unique


def _combine(results: Iterable[PolicyResult]) -> Decision:
    results = tuple(results)
    allowed = all(r.allowed or r.policy.shadow for r in results)
    if allowed:
        return Decision(True, results)
    # A rejected request stores nothing, so the policies that would have admitted it report their state
    # as it stands (one more remaining, one emission interval sooner), not as if this request had counted.
    return Decision(False, tuple(r if not r.allowed else _uncounted(r) for r in results))


def _uncounted(result: PolicyResult) -> PolicyResult:
    interval = interval_us(result.policy) / MICROS
    return PolicyResult(
        result.policy,
        True,
        min(result.policy.burst, result.remaining + 1),
        max(0.0, result.reset_after - interval),
        0.0,
    )


def observe_decision(decision: Decision, observe: Observe | None) -> None:
    """Report one outcome per policy: `limited`, `shadow_limited`, `near_limit` or `allowed`."""
    if observe is None:
        return
    for result in decision.results:
        if not result.allowed:
            outcome = "shadow_limited" if result.policy.shadow else "limited"
        elif result.remaining <= result.policy.burst * NEAR_LIMIT_FRACTION:
            outcome = "near_limit"
        else:
            outcome = "allowed"
        try:
            observe(result.policy.name, outcome)
        except Exception:  # metrics must never break a request
            logger.exception("rate-limit observer failed")


def _call_hook(hook: Callable[..., None] | None, *args: Any) -> None:
    if hook is None:
        return
    try:
        hook(*args)
    except Exception:  # metrics must never break a request
        logger.exception("rate-limit hook failed")


class RateLimiterUnavailable(ServiceUnavailable):
    """Redis could not be asked (error, timeout, open circuit in `closed` mode): 503, never 500."""

    code = "rate_limiter_unavailable"

    def __init__(self, detail: str = "rate limiter unavailable") -> None:
        super().__init__(detail)


class RateLimiter(Protocol):
    """Admit or reject a request against all of its policies at once."""

    async def acquire(self, hits: Sequence[Hit]) -> Decision:
        """Evaluate every hit; commit them all when no enforced policy rejects, else change nothing."""
        ...

    async def aclose(self) -> None:
        """Release resources held by the limiter (not the Redis client, which the app owns)."""
        ...


# ---------------------------------------------------------------------------------------------- local


class LocalRateLimiter:
    """An in-process GCRA with the Redis limiter's semantics; memory bounded by `max_keys` (LRU)."""

    def __init__(
        self,
        clock: Clock = time.monotonic,
        max_keys: int = 100_000,
        *,
        observe: Observe | None = None,
    ) -> None:
        """Create an empty limiter; `clock` returns seconds."""
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._clock = clock
        self._max_keys = max_keys
        self._observe = observe
        self._tats: OrderedDict[str, float] = OrderedDict()
        # A whole-table sweep for expired keys runs at most once per this many overflows (amortised O(1)).
        self._sweep_every = max(1, max_keys // 10)
        self._overflows = 0

    def __len__(self) -> int:
        """Return the number of keys currently held."""
        return len(self._tats)

    async def acquire(self, hits: Sequence[Hit]) -> Decision:
        """Evaluate and, when admitted, commit every hit; atomic because it never awaits."""
        decision = self.acquire_now(hits)
        observe_decision(decision, self._observe)
        return decision

    def acquire_now(self, hits: Sequence[Hit]) -> Decision:
        """Do `acquire` synchronously (the same event-loop step reads and writes every key)."""
        unique = _unique(hits)
        if not unique:
            return ALLOW_ALL
        now = self._clock() * MICROS
        results: list[PolicyResult] = []
        updates: list[tuple[str, float]] = []
        for hit in unique:
            key = state_key(hit)
            interval = interval_us(hit.policy)
            tat = self._tats.get(key, now)
            if tat < now:
                tat = now
            new_tat = tat + interval
            diff = now - (new_tat - hit.policy.burst * interval)
            if diff >= -EPSILON_US:
                remaining = math.floor((diff + EPSILON_US) / interval)
                results.append(PolicyResult(hit.policy, True, remaining, (new_tat - now) / MICROS, 0.0))
                updates.append((key, new_tat))
            else:
                results.append(PolicyResult(hit.policy, False, 0, (tat - now) / MICROS, -diff / MICROS))
        decision = _combine(results)
        if decision.allowed:
            for key, new_tat in updates:
                self._tats[key] = new_tat
                self._tats.move_to_end(key)
            self._evict(now)
        return decision

    def _evict(self, now: float) -> None:
        # Expired keys equal "fresh" state and go first; a live key is dropped only beyond `max_keys`. Keys sit
        # in update order (least recently updated first), so the expired ones are mostly at the front: purging
        # from there until the first live key costs no scan of the whole table.
        while self._tats:
            key, tat = next(iter(self._tats.items()))
            if tat > now:
                break
            del self._tats[key]
        if len(self._tats) <= self._max_keys:
            return
        # An expired key may sit behind a live one (a long policy's key updated before a short one's).
        self._overflows += 1
        if self._overflows >= self._sweep_every:
            self._overflows = 0
            for expired in [key for key, tat in self._tats.items() if tat <= now]:
                del self._tats[expired]
        while len(self._tats) > self._max_keys:
            self._tats.popitem(last=False)

    async def aclose(self) -> None:
        """Forget all state."""
        self._tats.clear()


# ---------------------------------------------------------------------------------------------- redis


class RedisRateLimiter:
    """GCRA in one Lua script per request (per slot group on Redis Cluster); see the module docstring."""

    def __init__(
        self,
        redis: Any,
        *,
        clock: Clock | None = None,
        cluster: bool | None = None,
        observe: Observe | None = None,
    ) -> None:
        """Use `redis` (redis.asyncio Redis or RedisCluster); `clock` (seconds) replaces Redis TIME."""
        self._redis = redis
        self._clock = clock
        self._cluster = isinstance(redis, RedisCluster) if cluster is None else cluster
        self._observe = observe
        self._cluster_ready = False
        self._acquire_sha = hashlib.sha1(ACQUIRE_SCRIPT.encode(), usedforsecurity=False).hexdigest()
        self._refund_sha = hashlib.sha1(REFUND_SCRIPT.encode(), usedforsecurity=False).hexdigest()

    async def acquire(self, hits: Sequence[Hit]) -> Decision:
        """Evaluate every hit in Redis; raise RateLimiterUnavailable when Redis errors or times out."""
        unique = _unique(hits)
        if not unique:
            return ALLOW_ALL
        now = "" if self._clock is None else repr(self._clock() * MICROS)
        try:
            if self._cluster:
                if not self._cluster_ready:
                    # redis-py's async cluster races when its first commands run concurrently and each
                    # starts the topology discovery; one explicit (locked, idempotent) initialize avoids it.
                    await self._redis.initialize()
                    self._cluster_ready = True
                decision = await self._acquire_by_slot(unique, now)
            else:
                _, results = await self._acquire_group(unique, now)
                decision = _combine(results)
        except REDIS_ERRORS as exc:
            raise RateLimiterUnavailable(f"rate limiter unavailable: {type(exc).__name__}") from exc
        observe_decision(decision, self._observe)
        return decision

    async def _acquire_group(self, hits: Sequence[Hit], now: str) -> tuple[bool, list[PolicyResult]]:
        keys = [state_key(hit) for hit in hits]
        args: list[str] = [now]
        for hit in hits:
            args += [repr(interval_us(hit.policy)), str(hit.policy.burst), "1" if hit.policy.shadow else "0"]
        reply = await self._run(self._acquire_sha, ACQUIRE_SCRIPT, keys, args)
        results = []
        for index, hit in enumerate(hits):
            allowed, remaining, reset_us, retry_us = reply[1 + 4 * index : 5 + 4 * index]
            results.append(
                PolicyResult(
                    hit.policy,
                    int(allowed) == 1,
                    int(remaining),
                    float(reset_us) / MICROS,
                    float(retry_us) / MICROS,
                )
            )
        return int(reply[0]) == 1, results

    async def _acquire_by_slot(self, hits: Sequence[Hit], now: str) -> Decision:
        groups: dict[int, list[Hit]] = {}
        for hit in hits:
            groups.setdefault(key_slot(state_key(hit).encode()), []).append(hit)
        ordered = list(groups.values())
        # Every group runs to its end even when another fails: only then is it known which groups committed
        # and must be refunded. Each command is bounded by the client's Redis budget, so this waits no longer.
        outcomes = await asyncio.gather(
            *(self._acquire_group(group, now) for group in ordered), return_exceptions=True
        )
        failure: Exception | None = None
        committed: list[list[Hit]] = []
        for outcome, group in zip(outcomes, ordered, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome  # cancellation (client gone, deadline) or an interrupt: stop, as gather would
                if failure is None:
                    failure = outcome
            elif outcome[0]:
                # Only keys the reserve step wrote: enforced or shadow policies that admitted the request.
                reserved = [hit for hit, result in zip(group, outcome[1], strict=True) if result.allowed]
                if reserved:
                    committed.append(reserved)
        if failure is not None:
            # The request is not admitted through Redis (the fallback or a 503 decides it): the slots that
            # committed get their reservations back, or a partial outage would drain budgets. Best effort:
            # the slot's error, not a refund's, goes on to the breaker and RATE_LIMIT_ON_REDIS_ERROR.
            refund_errors = await self._refund_all(committed, now)
            if refund_errors:
                logger.warning(
                    "rate limiter: %d of %d reservations not returned after a Redis error (%s; refund: %s)",
                    len(refund_errors),
                    len(committed),
                    type(failure).__name__,
                    type(refund_errors[0]).__name__,
                )
            raise failure
        results = [
            result for outcome in outcomes if not isinstance(outcome, BaseException) for result in outcome[1]
        ]
        decision = _combine(results)
        if not decision.allowed:
            # Return the reservations of the slot groups that committed (see the module docstring).
            refund_errors = await self._refund_all(committed, now)
            if refund_errors:
                raise refund_errors[0]
        return decision

    async def _refund_all(self, committed: Sequence[Sequence[Hit]], now: str) -> list[Exception]:
        # Concurrently, one script per slot group; every refund is tried, and their errors are returned.
        outcomes = await asyncio.gather(
            *(self._refund(hits, now) for hits in committed), return_exceptions=True
        )
        errors = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome
                errors.append(outcome)
        return errors

    async def _refund(self, hits: Sequence[Hit], now: str) -> None:
        keys = [state_key(hit) for hit in hits]
        args = [now, *(repr(interval_us(hit.policy)) for hit in hits)]
        await self._run(self._refund_sha, REFUND_SCRIPT, keys, args)

    async def _run(self, sha: str, script: str, keys: Sequence[str], args: Sequence[str]) -> Any:
        try:
            return await self._redis.evalsha(sha, len(keys), *keys, *args)
        except NoScriptError:
            # SCRIPT FLUSH, a restart or a new Cluster node: EVAL runs it and caches it again.
            return await self._redis.eval(script, len(keys), *keys, *args)

    async def aclose(self) -> None:
        """Do nothing: the Redis client belongs to the app lifespan."""


# ---------------------------------------------------------------------------------------------- breaker


class CircuitBreaker:
    """Closed -> open after `failure_threshold` consecutive failures -> half_open probe after `cooldown`."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    def __init__(
        self,
        failure_threshold: int = 3,
        cooldown_seconds: float = 5.0,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        """Create a closed breaker; `clock` returns monotonic seconds."""
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self.failure_threshold = failure_threshold
        self.cooldown_seconds = cooldown_seconds
        self._clock = clock
        self._state = self.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_started: float | None = None
        self._listeners: list[Callable[[str], None]] = []

    @property
    def state(self) -> str:
        """Return the state name as last decided (`closed`, `open` or `half_open`)."""
        return self._state

    def subscribe(self, listener: Callable[[str], None]) -> None:
        """Call `listener(state)` on every state change."""
        self._listeners.append(listener)

    def allow(self) -> bool:
        """Tell whether a call may go to the dependency now (in half_open, one probe at a time)."""
        if self._state == self.CLOSED:
            return True
        now = self._clock()
        if self._state == self.OPEN:
            if now - self._opened_at < self.cooldown_seconds:
                return False
            self._set(self.HALF_OPEN)
        # A probe that never reported (its task was cancelled) is abandoned after one cooldown.
        if self._probe_started is not None and now - self._probe_started < self.cooldown_seconds:
            return False
        self._probe_started = now
        return True

    def record_success(self) -> None:
        """Close the circuit and reset the failure count."""
        self._failures = 0
        self._probe_started = None
        if self._state != self.CLOSED:
            self._set(self.CLOSED)

    def record_failure(self) -> None:
        """Count a failure; open the circuit at the threshold or when a half-open probe fails."""
        self._failures += 1
        self._probe_started = None
        if self._state == self.HALF_OPEN or (
            self._state == self.CLOSED and self._failures >= self.failure_threshold
        ):
            self._opened_at = self._clock()
            self._set(self.OPEN)

    def _set(self, state: str) -> None:
        self._state = state
        for listener in self._listeners:
            _call_hook(listener, state)


# ---------------------------------------------------------------------------------------------- resilient


class ResilientRateLimiter:
    """Redis first; on Redis errors, timeouts or an open circuit, the `mode` decides (local/open/closed).

    In `open` mode the answer is `UNCOUNTED`: allowed, with no policy counted.
    """

    def __init__(
        self,
        primary: RedisRateLimiter,
        fallback: LocalRateLimiter,
        *,
        mode: RedisErrorMode,
        breaker: CircuitBreaker,
        observe: Observe | None = None,
        on_redis_error: Callable[[], None] | None = None,
        on_circuit: Callable[[str], None] | None = None,
    ) -> None:
        """Combine the limiters; the hooks report decisions, Redis errors and breaker state changes."""
        if mode not in ("local", "open", "closed"):
            raise ValueError(f"unknown RATE_LIMIT_ON_REDIS_ERROR mode {mode!r}")
        self.primary = primary
        self.fallback = fallback
        self.mode = mode
        self.breaker = breaker
        self._observe = observe
        self._on_redis_error = on_redis_error
        if on_circuit is not None:
            breaker.subscribe(on_circuit)
            _call_hook(on_circuit, breaker.state)

    async def acquire(self, hits: Sequence[Hit]) -> Decision:
        """Ask Redis, or degrade per `mode`; raises only RateLimiterUnavailable (in `closed` mode)."""
        if self.breaker.allow():
            try:
                decision = await self.primary.acquire(hits)
            except RateLimiterUnavailable as exc:
                self.breaker.record_failure()
                _call_hook(self._on_redis_error)
                logger.warning("rate limiter: Redis unavailable (%s); mode=%s", exc.detail, self.mode)
            else:
                self.breaker.record_success()
                observe_decision(decision, self._observe)
                return decision
        if self.mode == "open":
            return UNCOUNTED
        if self.mode == "closed":
            raise RateLimiterUnavailable()
        decision = self.fallback.acquire_now(hits)
        observe_decision(decision, self._observe)
        return decision

    async def aclose(self) -> None:
        """Close both limiters."""
        await self.primary.aclose()
        await self.fallback.aclose()


def build_rate_limiter(
    settings: Settings,
    redis: Any | None,
    *,
    observe: Observe | None = None,
    on_redis_error: Callable[[], None] | None = None,
    on_circuit: Callable[[str], None] | None = None,
    breaker: CircuitBreaker | None = None,
    clock: Clock | None = None,
) -> RateLimiter:
    """Build the process's limiter: in-process without Redis, else Redis with the configured fallback."""
    if redis is None:
        return LocalRateLimiter(observe=observe)
    return ResilientRateLimiter(
        RedisRateLimiter(redis, clock=clock),
        LocalRateLimiter(),
        mode=settings.rate_limit_on_redis_error,
        breaker=breaker or CircuitBreaker(),
        observe=observe,
        on_redis_error=on_redis_error,
        on_circuit=on_circuit,
    )


# ---------------------------------------------------------------------------------------------- routes


def route_hits(
    settings: Settings, route_class: str, *, user_id: str, agent_id: str | None = None
) -> list[Hit]:
    """Return the hits a request of `route_class` makes (agent policies only when an agent is given)."""
    try:
        names = ROUTE_POLICIES[route_class]
    except KeyError:
        raise ValueError(f"unknown rate-limit route class {route_class!r}") from None
    hits = []
    for name in names:
        policy = settings.rate_limits[name]
        if name.startswith("agent-"):
            if agent_id is not None:
                hits.append(Hit(policy, f"agent:{agent_id}"))
        else:
            hits.append(Hit(policy, f"user:{user_id}"))
    return hits


def rate_limited(decision: Decision) -> RateLimited:
    """Return the 429 for a rejected decision, carrying every RateLimit header and `Retry-After`."""
    worst = max(decision.rejected_by, key=lambda r: r.retry_after, default=None)
    exc = RateLimited(decision.retry_after, policy=worst.policy.name if worst else None)
    exc.headers.update(decision.headers())
    return exc


async def enforce(
    limiter: RateLimiter, settings: Settings, route_class: str, *, user_id: str, agent_id: str | None = None
) -> Decision:
    """Acquire the route's policies; raise RateLimited (with headers) when rejected, else return the Decision."""
    decision = await limiter.acquire(route_hits(settings, route_class, user_id=user_id, agent_id=agent_id))
    if not decision.allowed:
        raise rate_limited(decision)
    return decision


# ---------------------------------------------------------------------------------------------- auth


class IpAuthFailureGuard:
    """Counts failed authentications per client address block and blocks it once `ip-auth-failure` rejects.

    The block is an IPv4 address, or the IPv6 network of `ipv6_prefix` bits around an IPv6 address: an IPv6
    client holds at least a /64, and keyed per address it would rotate through it and never be limited.
    When the shared limiter cannot count (Redis down with RATE_LIMIT_ON_REDIS_ERROR=closed, which raises, or
    open, which answers `UNCOUNTED`), failures are counted in process, per replica, by the same policy, and
    those decisions go to `observe` (the shared limiter reports its own).
    """

    def __init__(
        self,
        limiter: RateLimiter,
        policy: RateLimitPolicy,
        trusted_proxies: tuple[IPNetwork, ...],
        clock: Clock = time.monotonic,
        *,
        max_blocked: int = 10_000,
        ipv6_prefix: int = DEFAULT_IPV6_PREFIX,
        observe: Observe | None = None,
    ) -> None:
        """Use `limiter` for the shared count; blocks are remembered locally (bounded by `max_blocked`)."""
        if not 32 <= ipv6_prefix <= 128:
            raise ValueError("ipv6_prefix must be between 32 and 128")
        self._limiter = limiter
        self._policy = policy
        self._trusted = trusted_proxies
        self._clock = clock
        self._max_blocked = max_blocked
        self._ipv6_prefix = ipv6_prefix
        self._blocked: OrderedDict[str, float] = OrderedDict()
        # For failed authentications only: `closed` still answers every other request with 503 and `open` still
        # allows it, but a failure left uncounted would let a client tell a valid token (503 or 200) from an
        # expired or revoked one (401) without limit for the whole outage. Its decisions are observed here, as
        # the shared limiter's local fallback observes its own: otherwise the guard's 429s would not show.
        self._fallback = LocalRateLimiter(clock, observe=observe)

    async def check(self, scope: Any) -> GatewayError | None:
        """Return RateLimited when the request's client IP is currently blocked, else None."""
        if not self._blocked:
            return None
        ip = self._client_block(scope)
        until = self._blocked.get(ip)
        if until is None:
            return None
        remaining = until - self._clock()
        if remaining <= 0:
            del self._blocked[ip]
            return None
        return RateLimited(
            math.ceil(remaining),
            "too many failed authentications from this address",
            policy=self._policy.name,
        )

    async def record(self, scope: Any) -> GatewayError | None:
        """Count one failed authentication; return RateLimited (and block the IP) when over the limit."""
        ip = self._client_block(scope)
        hits = [Hit(self._policy, f"ip:{ip}")]
        try:
            decision = await self._limiter.acquire(hits)
        except ServiceUnavailable:
            decision = UNCOUNTED
        if decision is UNCOUNTED:
            decision = await self._fallback.acquire(hits)
        if decision.allowed:
            return None
        now = self._clock()
        self._blocked[ip] = now + decision.retry_after
        self._blocked.move_to_end(ip)
        while len(self._blocked) > self._max_blocked:
            self._blocked.popitem(last=False)
        exc = rate_limited(decision)
        exc.detail = "too many failed authentications from this address"
        return exc

    def _client_block(self, scope: Any) -> str:
        return client_block(client_ip(scope, self._trusted), self._ipv6_prefix)

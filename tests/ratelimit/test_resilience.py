"""Redis outages and slowness: the circuit breaker and the three RATE_LIMIT_ON_REDIS_ERROR modes."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import pytest

from service.errors import ServiceUnavailable
from service.ratelimit import (
    CircuitBreaker,
    Hit,
    LocalRateLimiter,
    RateLimiterUnavailable,
    RedisRateLimiter,
    ResilientRateLimiter,
    build_rate_limiter,
    state_key,
)
from service.redis_client import close_redis, create_redis
from service.settings import RedisErrorMode, RedisTopology, Secret, Settings
from tests.ratelimit.conftest import ManualClock, policy
from tests.support.servers import RedisServer


class Recorder:
    """Collects what the limiter's hooks report."""

    def __init__(self) -> None:
        self.outcomes: list[tuple[str, str]] = []
        self.redis_errors = 0
        self.circuit: list[str] = []

    def observe(self, name: str, outcome: str) -> None:
        """Record one decision outcome."""
        self.outcomes.append((name, outcome))

    def redis_error(self) -> None:
        """Count one Redis error."""
        self.redis_errors += 1

    def on_circuit(self, state: str) -> None:
        """Record a breaker state change."""
        self.circuit.append(state)


@pytest.fixture
async def client(redis_url: str, client_kind: str) -> AsyncIterator[object]:
    """Yield a client built like production: 100 ms timeouts, no retries, pipelined or one by one."""
    limit = 100 if client_kind == "pipelined" else 0
    redis = create_redis(RedisTopology(url=redis_url), timeout=0.1, pipeline_limit=limit)
    try:
        yield redis
    finally:
        await close_redis(redis)


def resilient(
    redis: object, mode: RedisErrorMode, breaker_clock: ManualClock, recorder: Recorder, *, threshold: int = 2
) -> ResilientRateLimiter:
    """Build the production combination with a manual breaker clock."""
    return ResilientRateLimiter(
        RedisRateLimiter(redis),
        LocalRateLimiter(breaker_clock),
        mode=mode,
        breaker=CircuitBreaker(threshold, 10.0, clock=breaker_clock),
        observe=recorder.observe,
        on_redis_error=recorder.redis_error,
        on_circuit=recorder.on_circuit,
    )


@pytest.mark.parametrize("mode", ["local", "open", "closed"])
async def test_redis_outage_and_recovery(
    mode: RedisErrorMode, client: object, redis_server: RedisServer
) -> None:
    clock = ManualClock()
    recorder = Recorder()
    limiter = resilient(client, mode, clock, recorder)
    hit = Hit(policy(limit=3, period=3600, burst=3), "user:outage")
    key = state_key(hit)

    assert (await limiter.acquire([hit])).allowed
    with redis_server.client() as admin:
        assert admin.exists(key) == 1  # Redis was used

    redis_server.stop()
    outcomes: list[str] = []
    for _ in range(6):
        try:
            decision = await limiter.acquire([hit])
            outcomes.append("allowed" if decision.allowed else "limited")
        except ServiceUnavailable as exc:
            assert isinstance(exc, RateLimiterUnavailable) and exc.status == 503
            outcomes.append("unavailable")
    expected = {
        "local": ["allowed"] * 3 + ["limited"] * 3,  # the same policy, now in process (fresh state)
        "open": ["allowed"] * 6,
        "closed": ["unavailable"] * 6,
    }[mode]
    assert outcomes == expected
    assert recorder.redis_errors == 2  # then the open circuit spares Redis
    assert recorder.circuit == ["closed", "open"]

    redis_server.start()  # an empty Redis, as after a restart without persistence
    assert limiter.breaker.state == "open"
    clock.advance(10)  # the cooldown: the next request probes Redis
    decision = await limiter.acquire([hit])
    assert decision.allowed and decision.results[0].remaining == 2  # counted by Redis again
    assert recorder.circuit == ["closed", "open", "half_open", "closed"]
    with redis_server.client() as admin:
        assert admin.exists(key) == 1


async def test_failed_probe_reopens_the_circuit(client: object, redis_server: RedisServer) -> None:
    clock = ManualClock()
    recorder = Recorder()
    limiter = resilient(client, "local", clock, recorder, threshold=1)
    hit = Hit(policy(limit=100, period=60, burst=100), "user:probe")
    redis_server.stop()
    assert (await limiter.acquire([hit])).allowed
    clock.advance(10)
    assert (await limiter.acquire([hit])).allowed
    assert recorder.circuit == ["closed", "open", "half_open", "open"]
    assert recorder.redis_errors == 2
    clock.advance(5)  # still cooling down from the failed probe: Redis is not asked
    assert (await limiter.acquire([hit])).allowed
    assert recorder.redis_errors == 2


def start_debug_sleep(port: int, seconds: float) -> socket.socket:
    """Send DEBUG SLEEP on a raw connection and return once Redis is observably busy with it.

    The probe is a bare PING on a raw socket (no client handshake), so a test counting the commands a
    client sent during the sleep (INFO commandstats) can leave out just PING, DEBUG and its own INFO.
    """
    sock = socket.create_connection(("127.0.0.1", port))
    arg = str(seconds).encode()
    sock.sendall(b"*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n$%d\r\n%s\r\n" % (len(arg), arg))
    with socket.create_connection(("127.0.0.1", port)) as probe:
        probe.settimeout(0.05)
        # Condition wait: a PING left unanswered proves the single-threaded server is inside the sleep.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            probe.sendall(b"PING\r\n")
            try:
                assert probe.recv(64) == b"+PONG\r\n"
            except TimeoutError:
                return sock
    sock.close()
    raise AssertionError("DEBUG SLEEP never started")


async def test_slow_redis_times_out_and_falls_back(client: object, redis_server: RedisServer) -> None:
    clock = ManualClock()
    recorder = Recorder()
    limiter = resilient(client, "local", clock, recorder)
    hit = Hit(policy(limit=2, period=3600, burst=2), "user:slow")
    await limiter.acquire([hit])  # warm the connection and the script cache

    sleeper = await asyncio.to_thread(start_debug_sleep, redis_server.port, 0.6)
    try:
        decision = await limiter.acquire([hit])
    finally:
        await asyncio.to_thread(sleeper.recv, 64)  # "+OK" once the sleep ends
        sleeper.close()
    # The in-process limiter answered while Redis still slept: the 100 ms timeout beat the 600 ms sleep.
    assert decision.allowed and decision.results[0].remaining == 1
    assert recorder.redis_errors == 1
    assert limiter.breaker.state == "closed"  # one failure is below the threshold


async def test_redis_limiter_alone_raises_503_not_500(client: object, redis_server: RedisServer) -> None:
    limiter = RedisRateLimiter(client)
    redis_server.stop()
    with pytest.raises(RateLimiterUnavailable) as caught:
        await limiter.acquire([Hit(policy(), "user:x")])
    assert caught.value.status == 503 and caught.value.code == "rate_limiter_unavailable"


def test_breaker_opens_on_consecutive_failures_and_one_probe_at_a_time_closes_it() -> None:
    clock = ManualClock()
    changes: list[str] = []
    breaker = CircuitBreaker(3, 5.0, clock=clock)
    breaker.subscribe(changes.append)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # consecutive failures only
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.allow() and breaker.state == "closed"
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow()
    clock.advance(4.9)
    assert not breaker.allow()
    clock.advance(0.1)
    assert breaker.allow() and breaker.state == "half_open"
    assert not breaker.allow()  # one probe at a time
    clock.advance(5)
    assert breaker.allow()  # an abandoned probe is replaced after a cooldown
    breaker.record_success()
    assert breaker.state == "closed" and breaker.allow()
    assert changes == ["open", "half_open", "closed"]


async def test_build_rate_limiter_picks_the_implementation(client: object) -> None:
    settings = Settings(elevenlabs_api_key=Secret("k"), rate_limit_on_redis_error="closed")
    local = build_rate_limiter(settings, None)
    assert isinstance(local, LocalRateLimiter)
    recorder = Recorder()
    combined = build_rate_limiter(settings, client, on_circuit=recorder.on_circuit, observe=recorder.observe)
    assert isinstance(combined, ResilientRateLimiter) and combined.mode == "closed"
    assert recorder.circuit == ["closed"]  # the gauge starts with the current state
    assert (await combined.acquire([Hit(settings.rate_limits["user-delete"], "user:b")])).allowed
    assert recorder.outcomes == [("user-delete", "allowed")]
    await combined.aclose()
    await local.aclose()

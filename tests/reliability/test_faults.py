"""Fault injection while traffic runs: Redis down and slow, upstream failures, JWKS down.

Each test serves a real gateway with uvicorn, keeps several clients busy with a mix of routes and users,
breaks one dependency while requests are in flight, then heals it. Every time it demands: no 500 and
no dropped connection, the right problem response for the fault, recovery without a restart, no
foreign conversation ever served, and a ledger entry in Redis (read directly) for every signed URL
handed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.reliability.support import (
    AGENT,
    CONVERSATIONS,
    GENEROUS_LIMITS,
    HARNESS_REDIS_TIMEOUT_MS,
    SIGNED_URL,
    Op,
    Outcome,
    PortServedApp,
    ServedGateway,
    Traffic,
    add_fault,
    bearer,
    isolation_violations,
    lost_ledger_entries,
    minted,
    problem_violations,
    scaled,
    seed_ownership,
    served_gateway,
    standard_ops,
    write_config,
)
from tests.support.servers import RedisServer, free_port

USERS = [f"user{i}" for i in range(6)]
MODES = ("local", "open", "closed")


def status_codes(outcomes: Sequence[Outcome]) -> dict[str, set[tuple[int, str | None]]]:
    """Return, per operation, the set of (status, problem code) seen."""
    seen: dict[str, set[tuple[int, str | None]]] = {}
    for o in outcomes:
        code = o.body.get("code") if isinstance(o.body, dict) and o.status >= 400 else None
        seen.setdefault(o.op, set()).add((o.status, code))
    return seen


@contextlib.asynccontextmanager
async def traffic_on(
    gateway: ServedGateway, ops: Mapping[str, Op], *, concurrency: int = 6
) -> AsyncIterator[Traffic]:
    """Run traffic against a served gateway for the duration of the block."""
    async with gateway.client() as client, Traffic(client, USERS, ops, concurrency=concurrency) as traffic:
        yield traffic


def headers_for(users: Sequence[str]) -> dict[str, dict[str, str]]:
    """Return one bearer header per user."""
    return {user: bearer(user) for user in users}


def during(outcomes: Sequence[Outcome], start: float, end: float) -> list[Outcome]:
    """Return the outcomes whose whole request ran between `start` and `end` (monotonic)."""
    return [o for o in outcomes if o.started >= start and o.ended <= end]


# ------------------------------------------------------------------------------------------- Redis


@pytest.mark.slow
async def test_redis_outage_under_traffic_in_every_mode(
    durable_redis: RedisServer, emulator_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path, GENEROUS_LIMITS)
    with contextlib.closing(durable_redis.client()) as inspect, contextlib.ExitStack() as stack:
        owned, foreign = await seed_ownership(emulator_url, inspect, USERS)
        ops = standard_ops(headers_for(USERS), owned, foreign)
        gateways = {
            mode: stack.enter_context(
                served_gateway(
                    emulator_url,
                    durable_redis.url,
                    RATE_LIMIT_ON_REDIS_ERROR=mode,
                    GATEWAY_CONFIG=config,
                    REDIS_TIMEOUT_MS=HARNESS_REDIS_TIMEOUT_MS,
                )
            )
            for mode in MODES
        }
        async with contextlib.AsyncExitStack() as running:
            traffic = {
                mode: await running.enter_async_context(traffic_on(gw, ops)) for mode, gw in gateways.items()
            }
            await asyncio.gather(*(t.progress(30) for t in traffic.values()))

            in_flight = sum(t.in_flight for t in traffic.values())
            await asyncio.to_thread(durable_redis.stop)
            down = time.monotonic()
            await asyncio.gather(*(t.progress(scaled(90)) for t in traffic.values()))
            restarting = time.monotonic()
            await asyncio.to_thread(durable_redis.start)
            up = time.monotonic()

            recovered: dict[str, Outcome] = {}
            for mode, t in traffic.items():
                # A mint needs the ledger and (in closed mode) the limiter: both must be back.
                recovered[mode] = await t.until(
                    lambda o: o.op == "mint" and o.status == 200 and o.started > up, timeout=20
                )
            # The limiter's circuit closes again by itself in every mode (probe after the cooldown).
            for mode, gw in gateways.items():
                await wait_for_circuit_closed(gw, traffic[mode])
            await asyncio.gather(*(t.progress(30) for t in traffic.values()))

        assert in_flight > 0, "the fault must hit requests in flight"
        report = []
        for mode, t in traffic.items():
            outcomes = t.outcomes
            outage = during(outcomes, down, restarting)
            assert len(outage) >= 30, (mode, len(outage))
            limiter_code = "rate_limiter_unavailable" if mode == "closed" else "ledger_unavailable"
            expected_in_outage = {
                "mint": {(503, limiter_code)},
                "token": {(503, "rate_limiter_unavailable")} if mode == "closed" else {(200, None)},
                "list": {(503, limiter_code)},
                "details": {(503, limiter_code)},
                "foreign": {(503, limiter_code)},
                "health": {(200, None)},
            }
            seen = status_codes(outage)
            for op, statuses in seen.items():
                assert statuses <= expected_in_outage[op], (mode, op, statuses)
            allowed = {
                503: {"ledger_unavailable", "rate_limiter_unavailable"},
                404: {"not_found"},
            }
            assert problem_violations(outcomes, allowed) == [], mode
            assert isolation_violations(outcomes) == [], mode
            after = [o for o in outcomes if o.started > recovered[mode].ended]
            assert {(o.status, o.body.get("code")) for o in after if o.op in ("mint", "details")} == {
                (200, None)
            }, mode
            lost = lost_ledger_entries(inspect, outcomes)
            assert lost == [], (mode, lost)
            report.append(
                f"{mode}: {len(outcomes)} requests, {len(minted(outcomes))} signed URLs, "
                f"statuses {t.by_status()}, recovered {recovered[mode].ended - up:.2f} s after restart"
            )
        print("\n" + "\n".join(report))


async def test_pooled_redis_connections_survive_a_redis_restart(
    durable_redis: RedisServer, emulator_url: str, tmp_path: Path
) -> None:
    # Regression: redis-py 8 handed out pooled connections that died with the old Redis process, so the
    # first request on each failed with a 503 after Redis was already back (one immediate reconnect now).
    headers = headers_for(USERS)
    config = write_config(tmp_path, GENEROUS_LIMITS)
    with served_gateway(
        emulator_url, durable_redis.url, GATEWAY_CONFIG=config, REDIS_TIMEOUT_MS=HARNESS_REDIS_TIMEOUT_MS
    ) as gateway:
        async with gateway.client() as client:

            async def mint_all() -> list[httpx.Response]:
                return await asyncio.gather(
                    *(
                        client.get(SIGNED_URL, params={"agent_id": AGENT}, headers=headers[u])
                        for u in USERS * 3
                    )
                )

            before = await mint_all()  # fills the pool with several connections
            await asyncio.to_thread(durable_redis.stop)
            await asyncio.to_thread(durable_redis.start)
            after = await mint_all()  # nothing was sent during the outage: every pooled connection is stale
    assert [r.status_code for r in before] == [200] * len(before)
    assert [r.status_code for r in after] == [200] * len(after), [
        r.text for r in after if r.status_code != 200
    ]


async def wait_for_circuit_closed(gateway: ServedGateway, traffic: Traffic, timeout: float = 20.0) -> None:
    """Wait (while traffic flows, which drives the breaker's probe) until /metrics shows a closed circuit."""
    deadline = time.monotonic() + timeout
    async with gateway.client() as client:
        while True:
            body = (await client.get("/metrics")).text
            if 'convai_gateway_redis_circuit_state{state="closed"} 1.0' in body:
                return
            assert time.monotonic() < deadline, "the rate limiter never went back to Redis"
            await traffic.progress(10)


def unavailable_since(start: float) -> Callable[[Outcome], bool]:
    """Match a 503 to a request that began after `start` (monotonic)."""
    return lambda o: o.status == 503 and o.started > start


@contextlib.contextmanager
def frozen(server: RedisServer) -> Iterator[None]:
    """Freeze redis-server (SIGSTOP) for the block: connections stay open, nothing is answered until SIGCONT."""
    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.process.send_signal(signal.SIGCONT)


@pytest.mark.slow
async def test_slow_redis_times_out_fast_and_recovers(
    durable_redis: RedisServer, emulator_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path, GENEROUS_LIMITS)
    stalls = scaled(3)
    with contextlib.closing(durable_redis.client()) as inspect:
        owned, foreign = await seed_ownership(emulator_url, inspect, USERS)
        ops = standard_ops(headers_for(USERS), owned, foreign)
        with served_gateway(
            emulator_url, durable_redis.url, GATEWAY_CONFIG=config, REDIS_TIMEOUT_MS="250"
        ) as gateway:
            async with traffic_on(gateway, ops) as traffic:
                await traffic.progress(30)
                windows = []
                for _ in range(stalls):
                    in_flight = traffic.in_flight
                    # Redis stalls until the test sees what it waits for: the window ends on an event, so
                    # how fast this machine is never decides the outcome.
                    with frozen(durable_redis):
                        start = time.monotonic()
                        try:
                            # Condition wait, bounded only against a hang: requests that began after Redis
                            # froze must be answered 503 while it is still frozen (a Redis timeout, not the
                            # end of the stall, answered them).
                            await traffic.until(unavailable_since(start), count=3)
                        except TimeoutError:
                            raise AssertionError(
                                "no request that began after Redis froze was answered 503 while it stayed frozen"
                            ) from None
                        end = time.monotonic()  # before SIGCONT: everything that ended by now ended frozen
                    windows.append((start, end, in_flight))
                    await traffic.progress(20)
                healed = time.monotonic()
                recovered = await traffic.until(
                    lambda o: o.op == "mint" and o.status == 200 and o.started > healed
                )
                await traffic.progress(30)
                after = [o for o in traffic.outcomes if o.started > recovered.ended]
                await traffic.progress(30)

        outcomes = traffic.outcomes
        assert all(in_flight > 0 for _, _, in_flight in windows)
        stalled = [o for start, end, _ in windows for o in during(outcomes, start, end)]
        failures = [o for o in stalled if o.status == 503]
        allowed = {503: {"ledger_unavailable"}, 404: {"not_found"}}
        assert problem_violations(outcomes, allowed) == []
        assert {o.status for o in after if o.op in ("mint", "details")} == {200}
        assert isolation_violations(outcomes) == []
        assert lost_ledger_entries(inspect, outcomes) == []
        print(
            f"\nslow redis: {len(outcomes)} requests, {len(stalled)} during {stalls} stalls, "
            f"statuses {traffic.by_status()}, worst 503 latency "
            f"{max(o.ended - o.started for o in failures) * 1000:.0f} ms, recovered {recovered.ended - healed:.2f} s after"
        )


# ---------------------------------------------------------------------------------------- upstream

UPSTREAM_FAULTS: dict[str, tuple[dict[str, Any], dict[int, set[str]]]] = {
    "status-500": ({"kind": "status", "status": 500}, {502: {"upstream_error"}}),
    "status-503": ({"kind": "status", "status": 503}, {502: {"upstream_error"}}),
    "rate-limit-429": ({"kind": "rate_limit", "retry_after": 7}, {429: {"upstream_rate_limited"}}),
    "timeout": ({"kind": "slow", "delay_seconds": 1.0}, {504: {"upstream_timeout"}}),
    "malformed-json": ({"kind": "malformed_json"}, {502: {"upstream_error"}}),
    "dropped-connection": ({"kind": "drop"}, {502: {"upstream_error"}}),
}


def upstream_ops(
    headers: Mapping[str, Mapping[str, str]],
    owned: Mapping[str, Sequence[str]],
    foreign: Mapping[str, Sequence[str]],
) -> dict[str, Op]:
    """Return the usual mix plus feedback (a POST, never retried) and audio (streamed)."""
    ops = standard_ops(headers, owned, foreign)

    async def rate(client: httpx.AsyncClient, user: str) -> httpx.Response:
        return await client.post(
            f"{CONVERSATIONS}/{owned[user][1]}/feedback", json={"feedback": "like"}, headers=headers[user]
        )

    async def audio(client: httpx.AsyncClient, user: str) -> httpx.Response:
        return await client.get(f"{CONVERSATIONS}/{owned[user][1]}/audio", headers=headers[user])

    return {**ops, "feedback": rate, "audio": audio}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(UPSTREAM_FAULTS))
async def test_upstream_faults_under_traffic(
    kind: str, redis_server: RedisServer, redis_url: str, emulator_url: str, tmp_path: Path
) -> None:
    fault, expected = UPSTREAM_FAULTS[kind]
    times = scaled(30)
    with contextlib.closing(redis_server.client()) as inspect:
        owned, foreign = await seed_ownership(emulator_url, inspect, USERS)
        ops = upstream_ops(headers_for(USERS), owned, foreign)
        with served_gateway(
            emulator_url,
            redis_url,
            GATEWAY_CONFIG=write_config(tmp_path, GENEROUS_LIMITS),
            UPSTREAM_MAX_RETRIES="1",
            UPSTREAM_READ_TIMEOUT_SECONDS="0.3",
            UPSTREAM_AUDIO_READ_TIMEOUT_SECONDS="0.3",
            REDIS_TIMEOUT_MS=HARNESS_REDIS_TIMEOUT_MS,
        ) as gateway:
            async with (
                traffic_on(gateway, ops, concurrency=8) as traffic,
                httpx.AsyncClient(base_url=emulator_url) as emulator,
            ):
                await traffic.progress(20)
                in_flight = traffic.in_flight
                await add_fault(emulator, endpoint="*", times=times, **fault)
                injected = time.monotonic()
                while (await emulator.get("/_emulator/faults")).json():
                    await traffic.progress(5)
                drained = time.monotonic()
                recovered = await traffic.until(
                    lambda o: o.op in ("mint", "details") and o.status == 200 and o.started > drained, count=4
                )
                await traffic.progress(20)
                after = [o for o in traffic.outcomes if o.started > recovered.ended]

    outcomes = traffic.outcomes
    assert in_flight > 0
    faulted = [o for o in during(outcomes, injected, drained) if o.status not in (200, 404)]
    assert faulted, "the injected faults must reach the clients"
    allowed = {**expected, 404: {"not_found"}}
    # The one honest signal after an audio stream has started (headers sent) is an incomplete body.
    tolerated = [
        o for o in outcomes if not (kind == "dropped-connection" and o.op == "audio" and o.status == 0)
    ]
    assert problem_violations(tolerated, allowed) == []
    assert isolation_violations(outcomes) == []
    assert after and {o.status for o in after} <= {200, 404}, "recovered without a restart"
    for o in outcomes:
        if o.status == 429:
            assert o.headers["retry-after"] == "7"
    with contextlib.closing(redis_server.client()) as inspect:
        assert lost_ledger_entries(inspect, outcomes) == []
    print(
        f"\nupstream {kind}: {len(outcomes)} requests, {times} faults injected, statuses {traffic.by_status()}, "
        f"recovered {recovered.ended - drained:.2f} s after the queue drained"
    )


# -------------------------------------------------------------------------------------------- JWKS


def jwks_server_app(keys: Mapping[str, rsa.RSAPrivateKey]) -> Starlette:
    """Return an app serving the public halves of `keys` (by kid) at /jwks.json."""
    document = {
        "keys": [
            {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "alg": "RS256", "use": "sig"}
            for kid, key in keys.items()
        ]
    }

    async def jwks(request: Request) -> JSONResponse:
        return JSONResponse(document, headers={"Cache-Control": "max-age=600"})

    return Starlette(routes=[Route("/jwks.json", jwks)])


@contextlib.contextmanager
def jwks_server(port: int, keys: Mapping[str, rsa.RSAPrivateKey]) -> Iterator[None]:
    """Serve a JWKS on `port` for the duration of the block."""
    served = PortServedApp(jwks_server_app(keys), port).start()
    try:
        yield
    finally:
        served.stop()


def rs256_ops(keys: Mapping[str, rsa.RSAPrivateKey], owned: Mapping[str, Sequence[str]]) -> dict[str, Op]:
    """Return operations that each sign a fresh token (no verified-token cache hit): `kid` k1, or k2 (rotated)."""

    def header(user: str, kid: str) -> dict[str, str]:
        now = int(time.time())
        claims = {
            "sub": user,
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
            "scope": "convai:session convai:history",
        }
        return {
            "Authorization": f"Bearer {jwt.encode(claims, keys[kid], algorithm='RS256', headers={'kid': kid})}"
        }

    async def mint(client: httpx.AsyncClient, user: str) -> httpx.Response:
        return await client.get(
            "/v1/convai/conversation/get-signed-url", params={"agent_id": AGENT}, headers=header(user, "k1")
        )

    async def details(client: httpx.AsyncClient, user: str) -> httpx.Response:
        return await client.get(f"{CONVERSATIONS}/{owned[user][1]}", headers=header(user, "k1"))

    async def rotated(client: httpx.AsyncClient, user: str) -> httpx.Response:
        return await client.get(CONVERSATIONS, headers=header(user, "k2"))

    return {"mint": mint, "details": details, "rotated": rotated}


def jwks_gateway_env(port: int, tmp_path: Path) -> dict[str, str]:
    """Return the environment of a gateway that verifies RS256 tokens against a JWKS on `port` only."""
    return {
        "JWT_HS256_SECRET": "",
        "JWT_JWKS_URL": f"http://127.0.0.1:{port}/jwks.json",
        "JWKS_UNKNOWN_KID_COOLDOWN_SECONDS": "0",
        "GATEWAY_CONFIG": write_config(tmp_path, GENEROUS_LIMITS),
        "REDIS_TIMEOUT_MS": HARNESS_REDIS_TIMEOUT_MS,
    }


@pytest.mark.slow
async def test_jwks_server_down_keeps_known_keys_and_recovers(
    redis_server: RedisServer, redis_url: str, emulator_url: str, tmp_path: Path
) -> None:
    keys = {kid: rsa.generate_private_key(public_exponent=65537, key_size=2048) for kid in ("k1", "k2")}
    port = free_port()
    with contextlib.closing(redis_server.client()) as inspect:
        owned, _ = await seed_ownership(emulator_url, inspect, USERS)
    ops = rs256_ops(keys, owned)
    env = jwks_gateway_env(port, tmp_path)
    with contextlib.ExitStack() as jwks:
        jwks.enter_context(jwks_server(port, {"k1": keys["k1"]}))
        with served_gateway(emulator_url, redis_url, env) as gateway:
            async with traffic_on(gateway, ops) as traffic, gateway.client() as probe:
                await traffic.progress(30)
                in_flight = traffic.in_flight
                await asyncio.to_thread(jwks.close)  # the JWKS server goes away
                down = time.monotonic()
                await traffic.progress(scaled(60))
                ready_while_down = (await probe.get("/readyz")).status_code
                back = time.monotonic()
                jwks.enter_context(jwks_server(port, keys))  # back, now publishing the rotated-in k2
                recovered = await traffic.until(
                    lambda o: o.op == "rotated" and o.status == 200 and o.started > back
                )
                await traffic.progress(30)

    outcomes = traffic.outcomes
    assert in_flight > 0
    outage = during(outcomes, down, back)
    seen = status_codes(outage)
    # Keys already fetched keep verifying fresh tokens; an unknown kid is a 401, never a 5xx.
    assert seen["mint"] == {(200, None)} and seen["details"] == {(200, None)}
    assert seen["rotated"] == {(401, "invalid_token")}
    assert ready_while_down == 200, "the last good key set keeps the gateway ready"
    assert problem_violations(outcomes, {401: {"invalid_token"}}) == []
    assert all(o.status == 200 for o in outcomes if o.started > recovered.ended)
    with contextlib.closing(redis_server.client()) as inspect:
        assert lost_ledger_entries(inspect, outcomes) == []
    print(
        f"\njwks down: {len(outcomes)} requests, {len(outage)} during the outage, statuses {traffic.by_status()}, "
        f"rotated key accepted {recovered.ended - back:.2f} s after the JWKS came back"
    )


@pytest.mark.slow
async def test_gateway_started_while_jwks_is_down_is_unready_then_recovers(
    redis_url: str, emulator_url: str, tmp_path: Path
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    port = free_port()
    ops = rs256_ops({"k1": key, "k2": key}, {user: ["conv_x", "conv_x"] for user in USERS})
    env = jwks_gateway_env(port, tmp_path)
    with served_gateway(emulator_url, redis_url, env) as gateway:
        async with gateway.client() as client:
            not_ready = await client.get("/readyz")
            refused = await ops["mint"](client, "user0")
            with jwks_server(port, {"k1": key}):
                accepted = await ops["mint"](client, "user0")
                ready = await client.get("/readyz")
    assert not_ready.status_code == 503 and not not_ready.json()["checks"]["jwt_keys"]["ok"]
    assert refused.status_code == 401 and refused.json()["code"] == "invalid_token"
    assert accepted.status_code == 200, accepted.text
    assert ready.status_code == 200

"""JWKS refresh racing with a key rotation: a token naming a rotated-in kid must not lose to a stale fetch."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest

from service.jwks import JwksCache
from tests.auth.support import FakeClock, Keys, claims, jwks_issuer, public_jwk, settings_for, sign, started
from tests.support.servers import serve


class GatedJwks:
    """A JWKS endpoint that answers with the key set as it was when each request arrived.

    While `hold` is armed, a request is answered only once `release` is set: the fetch is in flight (already
    past the IdP's read of its keys) when the test rotates the published set.
    """

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self.keys = keys
        self.hold = False
        self.arrived = threading.Event()
        self.release = threading.Event()
        self.fetches = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        self.fetches += 1
        body = json.dumps({"keys": list(self.keys)}).encode()  # the set as of this request
        if self.hold:
            self.arrived.set()
            await asyncio.to_thread(self.release.wait, 10)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"cache-control", b"max-age=600")],
            }
        )
        await send({"type": "http.response.body", "body": body})


async def test_token_with_a_rotated_in_kid_is_accepted_when_a_stale_refresh_is_in_flight(
    keys: Keys, clock: FakeClock
) -> None:
    upstream = GatedJwks([public_jwk(keys.rsa, "k-old", "RS256")])
    with serve(upstream, lifespan="off", ws="none") as served:
        settings = settings_for(jwks_issuer(f"{served.url}/jwks.json"))
        async with started(settings, clock) as auth:
            [cache] = auth.jwks_caches
            assert isinstance(cache, JwksCache)
            # A scheduled refresh leaves; the IdP has read its (old) key set when the rotation happens.
            upstream.hold = True
            refresh = asyncio.create_task(cache.refresh())
            assert await asyncio.to_thread(upstream.arrived.wait, 10), "refresh never reached the JWKS"
            upstream.keys = [*upstream.keys, public_jwk(keys.rsa2, "k-new", "RS256")]
            upstream.hold = False

            joined = asyncio.Event()
            refetch = cache.refetch_for_unknown_kid

            async def spy() -> None:
                joined.set()  # the caller has reached the refetch (and sees the fetch in flight)
                await refetch()

            cache.refetch_for_unknown_kid = spy  # type: ignore[method-assign]
            token = sign(claims(sub="rotated"), keys.rsa2, "RS256", kid="k-new")
            login = asyncio.create_task(auth.authenticate(f"Bearer {token}"))
            await asyncio.wait_for(joined.wait(), 5)
            upstream.release.set()
            await asyncio.wait_for(refresh, 10)
            # The key is published and no cooldown applies (no unknown-kid fetch was made yet): the token that
            # arrived after the rotation must verify, not get a 401 from a fetch that began before it.
            principal = await asyncio.wait_for(login, 10)
    assert principal.user_id == "rotated"
    assert upstream.fetches == 3


async def _until(condition: Any, timeout: float = 5.0) -> None:
    """Wait (bounded) until `condition()` holds, yielding to the cache's background task meanwhile."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def test_a_gateway_that_started_during_a_jwks_outage_gets_ready_soon_after_the_jwks_returns(
    keys: Keys, clock: FakeClock
) -> None:
    # An unready pod gets no traffic (the readiness probe keeps it out of the Service), so no unknown-kid
    # refetch can rescue it: only the background retry can load the first key set.
    upstream = GatedJwks([public_jwk(keys.rsa, "k-1", "RS256")])
    down = True

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if down:
            upstream.fetches += 1
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await upstream(scope, receive, send)

    with serve(app, lifespan="off", ws="none") as served:
        outcomes: list[str] = []
        cache = JwksCache(
            f"{served.url}/jwks.json", clock=clock, poll_seconds=0.001, on_refresh=outcomes.append
        )
        await cache.start()
        try:
            # The IdP stays down for about three minutes of the pod's life: seven failed fetches.
            for attempt in range(2, 8):
                clock.advance(max(0.0, cache.next_refresh_at - clock()))
                await _until(lambda attempt=attempt: len(outcomes) >= attempt)
            assert outcomes == ["error"] * 7
            assert not cache.loaded
            down = False
            clock.advance(30)
            # Within 30 s of the IdP coming back, a never-loaded cache should have retried and become ready.
            try:
                await _until(lambda: cache.loaded, timeout=2.0)
            except TimeoutError:
                pytest.fail(
                    f"still unready 30 s after the JWKS returned; next retry in "
                    f"{cache.next_refresh_at - clock():.0f} s (readiness never triggers a fetch)"
                )
        finally:
            await cache.aclose()


def _step_now(coroutine: Any) -> asyncio.Task[None] | None:
    """Run a coroutine's first step right now, not in a later loop turn; return a task for the rest, if any."""
    try:
        waiting_on = coroutine.send(None)
    except StopIteration:
        return None

    async def rest() -> None:
        nonlocal waiting_on
        while True:  # what a Task does: resume the coroutine each time the future it waits on is done
            await asyncio.wait([waiting_on])
            try:
                waiting_on = coroutine.send(None)
            except StopIteration:
                return

    return asyncio.get_running_loop().create_task(rest())


async def test_an_unknown_kid_right_after_a_refresh_completes_still_gets_its_own_fetch(
    keys: Keys, clock: FakeClock
) -> None:
    # A scheduled refresh has just finished (its task is done) but its done callbacks have not run yet: a
    # token naming a rotated-in kid, handled in that same loop turn, must not take the finished fetch, which
    # read the set before the rotation, for its own refetch (which would also start the cooldown and refuse
    # the new key for 30 s).
    upstream = GatedJwks([public_jwk(keys.rsa, "k-old", "RS256")])
    with serve(upstream, lifespan="off", ws="none") as served:
        loop = asyncio.get_running_loop()
        rest: list[asyncio.Task[None] | None] = []
        armed = False

        def refetch_in_this_turn() -> None:
            rest.append(_step_now(cache.refetch_for_unknown_kid()))

        def on_refresh(outcome: str) -> None:
            # Called inside the fetch task's last step, after the IdP served the old set; a handle queued
            # here runs before the task's done callbacks.
            if armed:
                upstream.keys = [*upstream.keys, public_jwk(keys.rsa2, "k-new", "RS256")]
                loop.call_soon(refetch_in_this_turn)

        settings = settings_for(jwks_issuer(f"{served.url}/jwks.json"))
        async with started(settings, clock, on_jwks_refresh=on_refresh) as auth:
            [cache] = auth.jwks_caches
            assert isinstance(cache, JwksCache)
            armed = True
            await cache.refresh()  # the scheduled refresh
            armed = False
            assert len(rest) == 1
            await asyncio.gather(*(task for task in rest if task is not None))
            token = sign(claims(sub="rotated"), keys.rsa2, "RS256", kid="k-new")
            principal = await auth.authenticate(f"Bearer {token}")
    assert principal.user_id == "rotated"
    assert upstream.fetches == 3

"""The lifespan closes every shared client on shutdown, even when closing one of them fails."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

import service.app
import service.redis_client
from service.app import create_app
from service.auth import Authenticator
from service.settings import load_settings
from tests.conftest import EMULATOR_API_KEY
from tests.support.gateway import gateway_env


@pytest.mark.parametrize("failing", ["authenticator", "limiter"])
async def test_a_failing_close_does_not_leave_the_other_clients_open(
    emulator_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    app = create_app(load_settings(gateway_env(emulator_url, EMULATOR_API_KEY, redis_url)))
    redis_closed: list[Any] = []
    real_close_redis = service.redis_client.close_redis

    async def recording_close_redis(client: Any) -> None:
        redis_closed.append(client)
        await real_close_redis(client)

    async def broken_close(self: Any) -> None:
        # A failure of the gateway's own close, which no real dependency can be made to produce on demand.
        raise RuntimeError(f"{failing} close failed")

    monkeypatch.setattr(service.app, "close_redis", recording_close_redis)
    services: Any = None
    # Whether the failure is re-raised or only logged is the lifespan's choice; the leak is not.
    with contextlib.suppress(RuntimeError):
        async with app.router.lifespan_context(app) as state:
            assert state is not None
            services = state["services"]
            # Use Redis once, so its pool holds a live connection that must be closed.
            assert await services.ledger.ping()
            if failing == "authenticator":
                monkeypatch.setattr(Authenticator, "aclose", broken_close)
            else:
                monkeypatch.setattr(type(services.limiter), "aclose", broken_close)
    # One close failing must not leak the others: the upstream HTTP client and the Redis pool are closed too.
    assert services.upstream._http.is_closed, "upstream HTTP client left open"
    assert redis_closed == [services.redis], "Redis client left open"

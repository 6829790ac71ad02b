"""Session-wide real parts: a private redis-server and the upstream emulator on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

import pytest

from tests.support.servers import RedisServer
from tests.support.tls import TlsFiles, write_tls_files

if TYPE_CHECKING:
    from tests.support.gateway import Gateway

EMULATOR_API_KEY = "xi-test-key-4f1c9a7e2b6d8e0f3a5c7b9d1e2f4a6c"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """Start one private redis-server for the whole test session."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """Write a private CA, a server certificate for 127.0.0.1 and a client certificate, once per session."""
    return write_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """Yield the private Redis URL with an empty, running server; restart it if a test stopped it."""
    redis_server.start()
    redis_server.flush()
    yield redis_server.url
    redis_server.start()


@pytest.fixture(scope="session")
def emulator_server() -> Iterator[str]:
    """Serve one empty upstream emulator on loopback for the whole session; yield its URL."""
    from service.emulator import create_emulator_app
    from tests.support.servers import serve

    with serve(create_emulator_app(EMULATOR_API_KEY, seed=False)) as served:
        yield served.url


@pytest.fixture
def emulator_url(emulator_server: str) -> str:
    """Yield the emulator URL after clearing its conversations, faults and request log."""
    import httpx

    httpx.post(f"{emulator_server}/_emulator/reset", json={"seed": False}).raise_for_status()
    return emulator_server


@pytest.fixture
def make_gateway(emulator_url: str, redis_url: str) -> Callable[..., AbstractAsyncContextManager[Gateway]]:
    """Return a factory: `async with make_gateway(OWNERSHIP_MODE="ledger") as gw:` (REDIS_URL="" = in-process)."""
    from tests.support.gateway import run_gateway

    def factory(**env: str) -> AbstractAsyncContextManager[Gateway]:
        return run_gateway(emulator_url, EMULATOR_API_KEY, redis_url, env)

    return factory


@pytest.fixture
async def gateway(
    make_gateway: Callable[..., AbstractAsyncContextManager[Gateway]],
) -> AsyncIterator[Gateway]:
    """Yield a gateway with the private Redis and the emulator."""
    async with make_gateway() as running_gateway:
        yield running_gateway

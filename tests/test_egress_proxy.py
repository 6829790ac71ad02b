"""EGRESS_PROXY_URL: every outbound call (ElevenLabs, JWKS) goes through it; proxy variables never do."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager

import pytest

from service.jwks import JwksCache
from service.settings import Secret
from service.upstream import split_proxy_url
from tests.auth.support import JwksServerState, generate_keys, jwks_app, public_jwk
from tests.support.forward_proxy import ForwardProxy, forward_proxy
from tests.support.gateway import Gateway
from tests.support.servers import free_port, serve

MakeGateway = Callable[..., AbstractAsyncContextManager[Gateway]]
SIGNED_URL = "/v1/convai/conversation/get-signed-url"
PROXY_PASSWORD = "pr0xy-p@ss"  # a test credential, asserted never to leak
JWKS_KEYS = [public_jwk(generate_keys().rsa, "k-rsa")]
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


@pytest.fixture
def proxy() -> Iterator[ForwardProxy]:
    """Yield a recording forward proxy on loopback."""
    with forward_proxy() as running:
        yield running


def _with_credentials(url: str, password: str = PROXY_PASSWORD) -> str:
    return url.replace("http://", f"http://gateway:{password.replace('@', '%40')}@")


async def test_upstream_calls_go_through_the_egress_proxy_with_its_credentials(
    make_gateway: MakeGateway, proxy: ForwardProxy
) -> None:
    async with make_gateway(EGRESS_PROXY_URL=_with_credentials(proxy.url)) as gw:
        response = await gw.client.get(
            SIGNED_URL, params={"agent_id": "agent_demo"}, headers=gw.headers("alice")
        )
        assert response.status_code == 200, response.text
        emulator_host = gw.emulator_url.removeprefix("http://")
        [call] = [r for r in proxy.requests() if r.path == SIGNED_URL]
        assert call.host == emulator_host
        expected = base64.b64encode(f"gateway:{PROXY_PASSWORD}".encode()).decode()
        assert call.proxy_authorization == f"Basic {expected}"
        assert not any(PROXY_PASSWORD in line or "p%40ss" in line for line in gw.logs)


async def test_jwks_is_fetched_through_the_egress_proxy(proxy: ForwardProxy) -> None:
    with serve(jwks_app(JwksServerState(keys=JWKS_KEYS)), ws="none") as jwks_server:
        cache = JwksCache(f"{jwks_server.url}/jwks.json", proxy=Secret(_with_credentials(proxy.url)))
        await cache.start()
        try:
            assert cache.loaded, cache.last_error
        finally:
            await cache.aclose()
    [call] = proxy.requests()
    assert (call.method, call.path) == ("GET", "/jwks.json")
    assert call.proxy_authorization is not None and call.proxy_authorization.startswith("Basic ")


async def test_proxy_variables_in_the_environment_are_ignored(
    make_gateway: MakeGateway, proxy: ForwardProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.setenv(name, proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    async with make_gateway() as gw:
        response = await gw.client.get(
            SIGNED_URL, params={"agent_id": "agent_demo"}, headers=gw.headers("alice")
        )
        assert response.status_code == 200, response.text
    with serve(jwks_app(JwksServerState(keys=JWKS_KEYS)), ws="none") as jwks_server:
        cache = JwksCache(f"{jwks_server.url}/jwks.json")
        await cache.start()
        try:
            assert cache.loaded, cache.last_error
        finally:
            await cache.aclose()
    assert proxy.requests() == []


async def test_unreachable_egress_proxy_fails_the_call_without_showing_its_credentials(
    make_gateway: MakeGateway,
) -> None:
    dead_proxy = _with_credentials(f"http://127.0.0.1:{free_port()}")
    async with make_gateway(EGRESS_PROXY_URL=dead_proxy, UPSTREAM_MAX_RETRIES="0") as gw:
        response = await gw.client.get(
            SIGNED_URL, params={"agent_id": "agent_demo"}, headers=gw.headers("alice")
        )
        assert response.status_code == 502, response.text
        assert response.json()["detail"] == "upstream is unreachable"
        assert PROXY_PASSWORD not in response.text
        assert not any(PROXY_PASSWORD in line or "p%40ss" in line for line in gw.logs)


@pytest.mark.parametrize(
    ("url", "bare", "credentials"),
    [
        ("http://proxy.internal:3128", "http://proxy.internal:3128", None),
        ("http://u:p%40ss@proxy.internal:3129/", "http://proxy.internal:3129", "u:p@ss"),
        ("http://u@[::1]:8888", "http://[::1]:8888", "u:"),
    ],
)
def test_proxy_url_is_split_into_url_and_basic_credentials(
    url: str, bare: str, credentials: str | None
) -> None:
    found, authorization = split_proxy_url(url)
    assert found == bare
    expected = None if credentials is None else "Basic " + base64.b64encode(credentials.encode()).decode()
    assert authorization == expected


async def test_https_upstream_is_tunnelled_with_connect_carrying_the_credentials(
    make_gateway: MakeGateway,
) -> None:
    heads: list[bytes] = []

    async def record_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Only the CONNECT head matters here; refusing the tunnel ends the call.
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(record_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with make_gateway(
            # localhost: should the proxy ever be bypassed, the call still stays on loopback.
            ELEVENLABS_BASE_URL=f"https://localhost:{free_port()}",
            EGRESS_PROXY_URL=_with_credentials(f"http://127.0.0.1:{port}"),
            UPSTREAM_MAX_RETRIES="0",
        ) as gw:
            response = await gw.client.get(
                SIGNED_URL, params={"agent_id": "agent_demo"}, headers=gw.headers("alice")
            )
            assert response.status_code == 502, response.text
            assert PROXY_PASSWORD not in response.text
    finally:
        server.close()
        await server.wait_closed()
    [head] = heads
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    assert request_line.startswith("CONNECT localhost:") and request_line.endswith(" HTTP/1.1")
    expected = base64.b64encode(f"gateway:{PROXY_PASSWORD}".encode()).decode()
    assert f"Proxy-Authorization: Basic {expected}" in header_lines
    assert not any(line.lower().startswith("xi-api-key") for line in header_lines)

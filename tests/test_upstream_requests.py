"""The upstream client sends exactly the request httpx's own `build_request` would, over real loopback HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from service.upstream import UpstreamClient, _no_cookies, create_transport
from tests.support.servers import ServedApp, serve

API_KEY = "xi-request-building-test-key-5b1e"
TRICKY_PARAMS = [
    ("agent_id", "agent 1&x=2"),
    ("cursor", "ab+/==?#%"),
    ("agent_id", "dup"),
    ("search", "naïve 'q' \"r\""),
    ("empty", ""),
]


class Recorder:
    """A raw ASGI upstream that records each request's method, raw path, query, headers and body."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Record the request and answer a JSON body every client call accepts."""
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.seen.append(
            {
                "method": scope["method"],
                "raw_path": scope["raw_path"],
                "query": scope["query_string"],
                "headers": sorted((k, v) for k, v in scope["headers"] if k != b"host"),
                "body": body,
            }
        )
        payload = b'{"conversations":[],"has_more":false,"signed_url":"wss://x","conversation_id":"c"}'
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


@pytest.fixture(scope="module")
def recorder() -> Iterator[tuple[Recorder, ServedApp]]:
    """Serve a fresh recorder on loopback for this module."""
    app = Recorder()
    with serve(app, ws="none") as served:
        yield app, served


@pytest.mark.parametrize("prefix", ["", "/api/v2"])
async def test_requests_match_httpx_build_request(recorder: tuple[Recorder, ServedApp], prefix: str) -> None:
    """Each call's method, path, query, headers and body equal those of httpx's build_request."""
    app, served = recorder
    http = httpx.AsyncClient(
        base_url=served.url + prefix,
        transport=create_transport("aiohttp"),
        headers={"xi-api-key": API_KEY},
        cookies=_no_cookies(),
        trust_env=False,
    )
    client = UpstreamClient(http, max_retries=0)
    reference = httpx.AsyncClient(
        base_url=served.url + prefix,
        transport=create_transport("aiohttp"),
        headers={"xi-api-key": API_KEY},
        cookies=_no_cookies(),
        trust_env=False,
    )
    async with http, reference:
        app.seen.clear()
        await client.list_conversations(TRICKY_PARAMS)
        await client.get_signed_url("agent/ü 1", branch_id="b&1")
        await client.send_feedback("conv ü/1?", "like")
        await client.delete_conversation("conv%2F2")
        sent = list(app.seen)
        app.seen.clear()
        for method, path, params, body in [
            ("GET", "/v1/convai/conversations", TRICKY_PARAMS, None),
            (
                "GET",
                "/v1/convai/conversation/get-signed-url",
                [("agent_id", "agent/ü 1"), ("include_conversation_id", "true"), ("branch_id", "b&1")],
                None,
            ),
            ("POST", "/v1/convai/conversations/conv%20%C3%BC%2F1%3F/feedback", None, {"feedback": "like"}),
            ("DELETE", "/v1/convai/conversations/conv%252F2", None, None),
        ]:
            query = httpx.QueryParams(tuple(params)) if params else None
            response = await reference.send(reference.build_request(method, path, params=query, json=body))
            await response.aclose()
    assert len(sent) == 4
    assert sent == app.seen
    assert sent[0]["raw_path"].startswith(prefix.encode() + b"/v1/convai/conversations")
    # A repeated key's values travel together, as httpx.QueryParams orders them.
    assert sent[0]["query"].startswith(b"agent_id=agent+1%26x%3D2&agent_id=dup&cursor=")


async def test_requests_follow_the_clients_headers_and_base_url_when_changed(
    recorder: tuple[Recorder, ServedApp],
) -> None:
    """A header set in place, a new header set and a new base URL reach the next call, as with build_request."""
    app, served = recorder
    http = httpx.AsyncClient(
        base_url=served.url,
        transport=create_transport("aiohttp"),
        headers={"xi-api-key": API_KEY},
        cookies=_no_cookies(),
        trust_env=False,
    )
    client = UpstreamClient(http, max_retries=0)
    async with http:
        app.seen.clear()
        await client.get_conversation("c1")
        http.headers["x-added"] = "in place"
        await client.get_conversation("c2")
        http.headers = {"xi-api-key": API_KEY + "-2"}
        http.base_url = httpx.URL(served.url + "/moved")
        await client.get_conversation("c3")
    first, second, third = (dict(seen["headers"]) for seen in app.seen)
    assert b"x-added" not in first
    assert second[b"x-added"] == b"in place"
    assert third[b"xi-api-key"] == (API_KEY + "-2").encode() and b"x-added" not in third
    assert app.seen[2]["raw_path"] == b"/moved/v1/convai/conversations/c3"

"""Security headers, CORS for an explicit origin list, and the request body limit."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from service.http_hygiene import (
    BodyLimitMiddleware,
    LoopbackHostMiddleware,
    cors_middleware,
    cors_response_headers,
)
from service.observability import Metrics
from tests.observability.support import Probe, build_app
from tests.support.servers import serve

ALLOWED = "https://app.example"
OTHER = "https://evil.example"
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
    "cross-origin-resource-policy": "same-site",
    "cache-control": "no-store",
}


def client(app: object, base_url: str = "http://testserver") -> httpx.AsyncClient:
    """Return an in-process client for `app`."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url=base_url)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/items/1", 200), ("GET", "/nowhere", 404), ("GET", "/problem", 404), ("POST", "/items/1", 405)],
)
async def test_security_headers_on_every_response(method: str, path: str, status: int) -> None:
    async with client(build_app(Metrics())) as http:
        response = await http.request(method, path)
    assert response.status_code == status
    for name, expected in SECURITY_HEADERS.items():
        assert response.headers.get(name) == expected, name
    assert "strict-transport-security" not in response.headers


async def test_security_headers_on_problem_and_413_bodies() -> None:
    async with client(build_app(Metrics(), max_body=10)) as http:
        problem = await http.get("/problem")
        too_large = await http.post("/echo", content=b"x" * 11)
    for response in (problem, too_large):
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["cache-control"] == "no-store"


async def test_route_set_headers_are_not_overwritten() -> None:
    async with client(build_app(Metrics())) as http:
        response = await http.get("/cached")
    assert response.headers["cache-control"] == "max-age=60"
    assert response.headers["x-frame-options"] == "SAMEORIGIN"
    assert response.headers.get_list("cache-control") == ["max-age=60"]
    assert response.headers["x-content-type-options"] == "nosniff"


async def test_hsts_only_over_https() -> None:
    app = build_app(Metrics())
    async with client(app, base_url="https://gateway.example") as https:
        secure = await https.get("/items/1")
    async with client(app) as http:
        plain = await http.get("/items/1")
    assert secure.headers["strict-transport-security"].startswith("max-age=63072000")
    assert "strict-transport-security" not in plain.headers


def test_cors_middleware_is_absent_without_origins_and_refuses_wildcard() -> None:
    assert cors_middleware(()) is None
    with pytest.raises(ValueError, match="explicitly"):
        cors_middleware(("*",))


@pytest.mark.parametrize("origin", [ALLOWED, OTHER, None], ids=["allowed", "other", "none"])
async def test_cors_headers_for_a_response_below_the_app_are_the_apps(origin: str | None) -> None:
    async with client(build_app(Metrics(), origins=(ALLOWED,))) as http:
        response = await http.get("/nowhere", headers={} if origin is None else {"Origin": origin})
    from_app = [
        (name, value)
        for name, value in response.headers.raw
        if name.startswith(b"access-control-") or name == b"vary"
    ]
    assert sorted(cors_response_headers((ALLOWED,), origin)) == sorted(from_app)
    assert cors_response_headers((), origin) == []  # no CORS_ALLOWED_ORIGINS, no CORS middleware


def preflight(origin: str, method: str = "GET", headers: str = "authorization") -> dict[str, str]:
    """Return the headers a browser sends on a CORS preflight."""
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers,
    }


async def test_preflight_from_allowed_origin_is_granted_and_cached() -> None:
    async with client(build_app(Metrics(), origins=(ALLOWED,))) as http:
        response = await http.options(
            "/items/1", headers=preflight(ALLOWED, "DELETE", "authorization,content-type")
        )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ALLOWED
    assert response.headers["access-control-max-age"] == "600"
    methods = {m.strip() for m in response.headers["access-control-allow-methods"].split(",")}
    assert methods == {"GET", "POST", "DELETE", "OPTIONS"}
    allowed_headers = response.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed_headers and "x-request-id" in allowed_headers
    assert "x-on-behalf-of" not in allowed_headers
    assert "access-control-allow-credentials" not in response.headers
    assert "Origin" in response.headers["vary"]


async def test_preflight_of_an_opentelemetry_instrumented_fetch_is_granted() -> None:
    # OpenTelemetry's browser fetch instrumentation adds W3C trace context headers to every request: refused,
    # the preflight failed and with it every call such a frontend made.
    async with client(build_app(Metrics(), origins=(ALLOWED,))) as http:
        response = await http.options(
            "/items/1", headers=preflight(ALLOWED, "GET", "authorization,traceparent,tracestate")
        )
    assert response.status_code == 200, response.text
    allowed_headers = {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}
    assert {"traceparent", "tracestate"} <= allowed_headers


async def test_preflight_from_other_origin_gets_no_grant() -> None:
    async with client(build_app(Metrics(), origins=(ALLOWED,))) as http:
        response = await http.options("/items/1", headers=preflight(OTHER))
    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers
    # Every error body is a problem (DESIGN section 1), refused preflights included.
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "cors_refused"
    assert response.json()["detail"] == "Disallowed CORS origin"


async def test_preflight_asking_for_act_as_header_is_refused() -> None:
    async with client(build_app(Metrics(), origins=(ALLOWED,))) as http:
        response = await http.options(
            "/items/1", headers=preflight(ALLOWED, "GET", "authorization,x-on-behalf-of")
        )
    assert response.status_code == 400
    assert "x-on-behalf-of" not in response.headers.get("access-control-allow-headers", "").lower()


async def test_simple_requests_echo_only_allowed_origins_and_expose_headers() -> None:
    async with client(build_app(Metrics(), origins=(ALLOWED, "https://admin.example"))) as http:
        allowed = await http.get("/items/1", headers={"Origin": ALLOWED})
        other = await http.get("/items/1", headers={"Origin": OTHER})
        same_origin = await http.get("/items/1")
    assert allowed.headers["access-control-allow-origin"] == ALLOWED
    exposed = {h.strip().lower() for h in allowed.headers["access-control-expose-headers"].split(",")}
    assert exposed == {"ratelimit", "ratelimit-policy", "retry-after", "x-request-id"}
    assert "access-control-allow-credentials" not in allowed.headers
    assert "access-control-allow-origin" not in other.headers
    assert "access-control-allow-origin" not in same_origin.headers
    for response in (allowed, other, same_origin):
        assert response.headers.get("access-control-allow-origin") != "*"


def test_preflight_over_real_http() -> None:
    with serve(build_app(Metrics(), origins=(ALLOWED,)), lifespan="off", ws="none") as server:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            granted = http.options("/v1/anything", headers=preflight(ALLOWED))
            refused = http.options("/v1/anything", headers=preflight(OTHER))
    assert granted.headers["access-control-allow-origin"] == ALLOWED
    assert granted.headers["access-control-max-age"] == "600"
    assert granted.headers["x-content-type-options"] == "nosniff"
    assert "access-control-allow-origin" not in refused.headers


def assert_413(response: httpx.Response) -> None:
    """Check that `response` is the payload_too_large problem."""
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["code"] == "payload_too_large" and body["status"] == 413


async def chunks(count: int, size: int) -> AsyncIterator[bytes]:
    """Yield a request body in chunks, without a Content-Length."""
    for _ in range(count):
        yield b"x" * size


async def test_body_over_limit_by_content_length_is_rejected_before_the_handler() -> None:
    probe = Probe()
    async with client(build_app(Metrics(), max_body=1024, probe=probe)) as http:
        response = await http.post("/echo", content=b"x" * 1025)
        at_limit = await http.post("/echo", content=b"x" * 1024)
    assert_413(response)
    assert at_limit.json() == {"length": 1024}
    assert probe.echo_calls == 1


async def test_chunked_body_over_limit_is_rejected() -> None:
    async with client(build_app(Metrics(), max_body=1024)) as http:
        over = await http.post("/echo", content=chunks(3, 400))
        under = await http.post("/echo", content=chunks(2, 400))
    assert "content-length" not in over.request.headers
    assert_413(over)
    assert under.json() == {"length": 800}


async def read_all_then_answer(scope: Scope, receive: Receive, send: Send) -> None:
    """Read the whole body, then answer 200 (a raw ASGI app without error handlers)."""
    while (await receive()).get("more_body", False):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"read it all"})


async def test_body_limit_answers_itself_for_apps_without_error_handlers() -> None:
    async with client(BodyLimitMiddleware(read_all_then_answer, max_bytes=100)) as http:
        over = await http.post("/", content=chunks(3, 50))
        under = await http.post("/", content=chunks(2, 50))
    assert_413(over)
    assert under.content == b"read it all"


def _chunked_body() -> Iterator[bytes]:
    for _ in range(5):
        yield b"y" * 300


def test_chunked_body_over_limit_over_real_http() -> None:
    with serve(build_app(Metrics(), max_body=1024), lifespan="off", ws="none") as server:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            response = http.post("/echo", content=_chunked_body())
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_413(response)
    assert json.loads(response.content)["detail"] == "the request body is larger than 1024 bytes"


async def test_http2_body_without_length_headers_is_still_limited() -> None:
    # HTTP/1.x frames a body only with Content-Length or Transfer-Encoding, so the middleware lets a
    # request without either through untouched; an HTTP/2 body needs neither and must stay limited.
    parts = [{"type": "http.request", "body": b"x" * 60, "more_body": True}] * 2
    parts.append({"type": "http.request", "body": b"", "more_body": False})
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return parts.pop(0)

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "http", "http_version": "2", "method": "POST", "path": "/", "headers": []}
    await BodyLimitMiddleware(read_all_then_answer, max_bytes=100)(scope, receive, send)  # type: ignore[arg-type]
    assert sent[0]["status"] == 413


async def test_unhandled_errors_carry_cors_headers_for_allowed_origins() -> None:
    # A browser can read a 500's problem body and request id only with the CORS headers on it.
    async with client(build_app(Metrics(), origins=(ALLOWED,))) as http:
        response = await http.get("/boom", headers={"Origin": ALLOWED})
    assert response.status_code == 500
    assert response.headers["access-control-allow-origin"] == ALLOWED
    assert "x-request-id" in response.headers["access-control-expose-headers"].lower()


async def plain_ok(scope: Scope, receive: Receive, send: Send) -> None:
    """Answer 200 to HTTP, accept a WebSocket: what the wrapped dev servers would do."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.accept"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def answer_to(scope_type: str, headers: list[tuple[bytes, bytes]]) -> list[dict[str, object]]:
    """Return what LoopbackHostMiddleware around `plain_ok` sends for one request with `headers`."""
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": scope_type, "method": "GET", "path": "/", "headers": headers}
    await LoopbackHostMiddleware(plain_ok)(scope, receive, send)  # type: ignore[arg-type]
    return sent


@pytest.mark.parametrize(
    "host",
    [
        "localhost", "localhost:8080", "LOCALHOST:8080", "127.0.0.1", "127.0.0.1:8080", "[::1]", "[::1]:8080",
        "app.localhost", "app.localhost:8080", "a.b-c.localhost:1",
    ],
)  # fmt: skip
async def test_loopback_hosts_are_served(host: str) -> None:
    sent = await answer_to("http", [(b"host", host.encode())])
    assert sent[0]["status"] == 200


@pytest.mark.parametrize(
    "host",
    [
        "evil.example", "evil.example:8080", "localhost.evil.example", "127.0.0.1.nip.io", "localhost.",
        "evillocalhost", "evil.localhost.example", "[::2]:8080", "[::1]x", "[::ffff:127.0.0.1]:8080",
        "127.0.0.2:8080", "0.0.0.0:8080", "localhost:", "localhost:8080:80", "localhost:abc", "-a.localhost",
        "", "user@localhost",
    ],
)  # fmt: skip
async def test_other_hosts_get_a_misdirected_request_problem(host: str) -> None:
    sent = await answer_to("http", [(b"host", host.encode())])
    start, body = sent
    assert start["status"] == 421
    assert (b"content-type", b"application/problem+json") in start["headers"]  # type: ignore[operator]
    problem = json.loads(body["body"])  # type: ignore[arg-type]
    assert (problem["status"], problem["code"]) == (421, "misdirected_request")


async def test_a_request_without_a_host_or_with_two_is_refused() -> None:
    assert (await answer_to("http", []))[0]["status"] == 421
    two = [(b"host", b"localhost"), (b"host", b"evil.example")]
    assert (await answer_to("http", two))[0]["status"] == 421


async def test_a_websocket_to_another_host_is_closed_before_it_is_accepted() -> None:
    assert await answer_to("websocket", [(b"host", b"evil.example")]) == [
        {"type": "websocket.close", "code": 1008}
    ]
    assert await answer_to("websocket", [(b"host", b"localhost:8090")]) == [{"type": "websocket.accept"}]


async def test_lifespan_passes_through_the_host_check() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    async def nothing() -> dict[str, object]:
        return {}

    async def drop(message: object) -> None:
        pass

    await LoopbackHostMiddleware(app)({"type": "lifespan"}, nothing, drop)
    assert seen == ["lifespan"]

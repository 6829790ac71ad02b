"""Request ids and the access log written by RequestContextMiddleware."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import httpx
import jwt
import pytest
from starlette.types import Message

from service.observability import ACCESS_LOGGER, JsonFormatter, Metrics, configure_logging, user_hash
from tests.observability.support import Probe, access_log_records, build_app
from tests.observability.test_logging import restore_logging
from tests.support.servers import serve

SIGNING_KEY = "observability-tests-signing-key-0123456789abcdef0123456789abcdef"


def client(app: object) -> httpx.AsyncClient:
    """Return an in-process client for `app`."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    """Return the access-log records, rendered by the production JSON formatter and parsed back."""
    formatter = JsonFormatter()
    return [json.loads(formatter.format(r)) for r in caplog.records if r.name == ACCESS_LOGGER]


@pytest.fixture
def access_caplog(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Capture INFO access-log records."""
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    return caplog


@pytest.mark.parametrize("offered", ["abc-123", "A.b_c-9", "x" * 64])
async def test_valid_client_request_id_is_kept_and_returned(offered: str) -> None:
    probe = Probe()
    async with client(build_app(Metrics(), probe=probe)) as http:
        response = await http.get("/items/1", headers={"X-Request-ID": offered})
    assert response.headers["x-request-id"] == offered
    assert response.json()["request_id"] == offered
    assert probe.request_ids == [offered]


@pytest.mark.parametrize("offered", ["x" * 65, "y" * 200, "has space", "semi;colon", "ümlaut", ""])
async def test_invalid_client_request_id_is_replaced(offered: str) -> None:
    async with client(build_app(Metrics())) as http:
        response = await http.get("/items/1", headers={b"X-Request-ID": offered.encode()})
    returned = response.headers["x-request-id"]
    assert returned != offered
    assert len(returned) == 32 and int(returned, 16) >= 0
    assert response.json()["request_id"] == returned


async def test_request_id_with_crlf_is_replaced() -> None:
    # httpx refuses to send CR/LF in a header, so drive the ASGI app directly with the raw bytes.
    app = build_app(Metrics())
    messages: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        messages.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": "/items/1", "raw_path": b"/items/1", "query_string": b"", "root_path": "",
        "headers": [(b"x-request-id", b"evil\r\nSet-Cookie: a=b")], "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }  # fmt: skip
    await app(scope, receive, send)  # type: ignore[arg-type]
    start = messages[0]
    headers = dict(start["headers"])  # type: ignore[call-overload]
    assert start["status"] == 200
    assert b"\r" not in headers[b"x-request-id"] and len(headers[b"x-request-id"]) == 32
    assert b"set-cookie" not in headers


async def test_generated_ids_are_unique() -> None:
    async with client(build_app(Metrics())) as http:
        ids = {(await http.get("/items/1")).headers["x-request-id"] for _ in range(20)}
    assert len(ids) == 20


async def test_request_id_is_on_problem_and_404_responses() -> None:
    async with client(build_app(Metrics())) as http:
        problem = await http.get("/problem", headers={"X-Request-ID": "req-1"})
        missing = await http.get("/nowhere", headers={"X-Request-ID": "req-2"})
    assert (problem.status_code, problem.headers["x-request-id"]) == (404, "req-1")
    assert (missing.status_code, missing.headers["x-request-id"]) == (404, "req-2")


async def test_access_log_line_has_fields_and_no_secrets(access_caplog: pytest.LogCaptureFixture) -> None:
    token = jwt.encode({"sub": "alice", "scope": "convai:session"}, SIGNING_KEY, algorithm="HS256")
    async with client(build_app(Metrics())) as http:
        response = await http.get(
            "/items/conv_secret_42",
            params={"token": token, "conversation_signature": "sig-abc", "agent_id": "agent_1"},
            headers={"Authorization": f"Bearer {token}", "X-Request-ID": "trace-77"},
        )
    assert response.status_code == 200

    lines = access_lines(access_caplog)
    assert len(lines) == 1
    line = lines[0]
    assert line["logger"] == ACCESS_LOGGER and line["level"] == "INFO"
    assert {k: line[k] for k in ("method", "route", "status", "request_id", "client_ip", "user")} == {
        "method": "GET",
        "route": "/items/{item_id}",
        "status": 200,
        "request_id": "trace-77",
        "client_ip": "127.0.0.1",
        "user": None,
    }
    assert line["duration_ms"] == pytest.approx(300.0)
    rendered = json.dumps(line)
    for secret in (token, "Bearer", "sig-abc", "conversation_signature", "agent_1", "conv_secret_42", "eyJ"):
        assert secret not in rendered


async def test_access_log_names_the_user_by_hash_only(access_caplog: pytest.LogCaptureFixture) -> None:
    async with client(build_app(Metrics())) as http:
        await http.get("/whoami")
    (line,) = access_lines(access_caplog)
    assert line["user"] == user_hash("alice@example.com")
    assert "alice" not in json.dumps(line)


@pytest.mark.parametrize(
    ("peer", "expected"),
    [("10.0.0.5", "198.51.100.23"), ("192.0.2.50", "192.0.2.50")],
    ids=["trusted-proxy-forwards", "untrusted-peer-spoof-ignored"],
)
async def test_access_log_uses_the_proxy_aware_client_ip(
    access_caplog: pytest.LogCaptureFixture, peer: str, expected: str
) -> None:
    import ipaddress

    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from service.observability import RequestContextMiddleware

    async def ok(request: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/", ok)],
        middleware=[
            Middleware(
                RequestContextMiddleware,
                metrics=Metrics(),
                trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),),
            )
        ],
    )
    transport = httpx.ASGITransport(app=app, client=(peer, 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        await http.get("/", headers={"X-Forwarded-For": "198.51.100.23"})
    (line,) = access_lines(access_caplog)
    assert line["client_ip"] == expected


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
VALID_TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


async def test_access_log_carries_the_trace_id_of_a_valid_traceparent(
    access_caplog: pytest.LogCaptureFixture,
) -> None:
    async with client(build_app(Metrics())) as http:
        response = await http.get(
            "/items/1", headers={"traceparent": VALID_TRACEPARENT, "tracestate": "vendor=opaque"}
        )
    assert response.status_code == 200
    (line,) = access_lines(access_caplog)
    assert line["trace_id"] == TRACE_ID
    assert "00f067aa0ba902b7" not in json.dumps(line) and "vendor" not in json.dumps(line)


async def test_access_log_has_no_trace_id_without_a_traceparent(
    access_caplog: pytest.LogCaptureFixture,
) -> None:
    async with client(build_app(Metrics())) as http:
        await http.get("/items/1")
    (line,) = access_lines(access_caplog)
    assert "trace_id" not in line


@pytest.mark.parametrize(
    "traceparent",
    [
        f"01-{TRACE_ID}-00f067aa0ba902b7-01",  # only version 00 is understood
        f"ff-{TRACE_ID}-00f067aa0ba902b7-01",  # the version W3C forbids
        f"00-{TRACE_ID.upper()}-00f067aa0ba902b7-01",  # hex is lower-case only
        f"00-{'0' * 32}-00f067aa0ba902b7-01",  # all-zero trace id
        f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE_ID[:-1]}-00f067aa0ba902b7-01",
        f"00-{TRACE_ID}-00f067aa0ba902b-01",
        f"00-{TRACE_ID}-00f067aa0ba902b7-1",
        f"00-{TRACE_ID}-00f067aa0ba902b7-01-extra",
        f"00-{TRACE_ID}-00f067aa0ba902b7-0g",
        f"00_{TRACE_ID}_00f067aa0ba902b7_01",
        f"00-{TRACE_ID}-00f067aa0ba902b7-01 ",
        f"00-{TRACE_ID[:24]}\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9-00f067aa0ba902b7-01",
        "",
    ],
)
async def test_an_invalid_traceparent_is_ignored_and_never_logged(
    access_caplog: pytest.LogCaptureFixture, traceparent: str
) -> None:
    async with client(build_app(Metrics())) as http:
        response = await http.get("/items/1", headers={b"traceparent": traceparent.encode("latin-1")})
    assert response.status_code == 200
    (line,) = access_lines(access_caplog)
    assert "trace_id" not in line
    assert TRACE_ID[:24] not in json.dumps(line).lower()


async def test_the_request_id_and_traceparent_are_both_read_whatever_their_order(
    access_caplog: pytest.LogCaptureFixture,
) -> None:
    async with client(build_app(Metrics())) as http:
        await http.get(
            "/items/1", headers=[("traceparent", VALID_TRACEPARENT), ("X-Request-ID", "req-after")]
        )
        await http.get(
            "/items/1", headers=[("X-Request-ID", "req-before"), ("traceparent", VALID_TRACEPARENT)]
        )
    lines = access_lines(access_caplog)
    assert [(line["request_id"], line["trace_id"]) for line in lines] == [
        ("req-after", TRACE_ID),
        ("req-before", TRACE_ID),
    ]


async def test_access_log_records_unhandled_errors(access_caplog: pytest.LogCaptureFixture) -> None:
    async with client(build_app(Metrics())) as http:
        assert (await http.get("/boom")).status_code == 500
    lines = access_lines(access_caplog)
    assert [(line["route"], line["status"]) for line in lines] == [("/boom", 500)]


@pytest.fixture
def json_stderr() -> Iterator[None]:
    """Install the production logging setup for one test and restore the previous one after it."""
    with restore_logging():
        configure_logging("INFO")
        yield


async def test_log_lines_written_during_a_request_carry_its_id(
    json_stderr: None, capsys: pytest.CaptureFixture[str]
) -> None:
    async with client(build_app(Metrics())) as http:
        await http.get("/whoami", headers={"X-Request-ID": "corr-123"})
    lines = [json.loads(raw) for raw in capsys.readouterr().err.splitlines()]
    route_line = next(line for line in lines if line["logger"] == "tests.observability.route")
    access = next(line for line in lines if line["logger"] == ACCESS_LOGGER)
    assert route_line["request_id"] == "corr-123" and route_line["msg"] == "handling whoami"
    assert access["request_id"] == "corr-123"


def test_client_disconnect_mid_stream_is_logged_and_counted() -> None:
    metrics = Metrics()
    with access_log_records() as waiter, serve(build_app(metrics), lifespan="off", ws="none") as server:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            with http.stream("GET", "/forever") as response:
                assert response.status_code == 200
                assert next(response.iter_raw()) == b"hello"
            # Leaving the block closes the connection while the server is still streaming.
        assert waiter.arrived.wait(timeout=10), "no access log after the client went away"

    (record,) = waiter.records
    assert record.route == "/forever"  # type: ignore[attr-defined]
    assert record.status == 200  # type: ignore[attr-defined]
    assert record.client_disconnected is True  # type: ignore[attr-defined]
    count = metrics.registry.get_sample_value(
        "convai_gateway_http_requests_total", {"method": "GET", "route": "/forever", "status": "200"}
    )
    assert count == 1


def test_a_response_cut_off_mid_body_is_logged_as_incomplete() -> None:
    # An upstream audio stream that fails mid-way leaves a 200 whose body never ended: the access line must
    # not read like a complete download.
    metrics = Metrics()
    with access_log_records() as waiter, serve(build_app(metrics), lifespan="off", ws="none") as server:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            with pytest.raises(httpx.RemoteProtocolError):
                http.get("/cut")
            complete = http.get("/stream")
        assert complete.status_code == 200
        assert waiter.wait_for(2, timeout=10), "no access log for both responses"

    cut, whole = sorted(waiter.records, key=lambda record: record.route)  # type: ignore[attr-defined]
    assert (cut.route, cut.status, cut.incomplete) == ("/cut", 200, True)  # type: ignore[attr-defined]
    assert not hasattr(cut, "client_disconnected")
    assert whole.route == "/stream"  # type: ignore[attr-defined]
    assert not hasattr(whole, "incomplete")


async def test_client_leaving_mid_body_is_a_499_not_a_500(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    app = build_app(metrics)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/echo",
        "raw_path": b"/echo",
        "query_string": b"",
        "root_path": "",
        "client": ("203.0.113.9", 5000),
        "server": ("testserver", 80),
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/json"),
            (b"content-length", b"40"),
        ],
    }
    messages: list[Message] = [
        {"type": "http.request", "body": b'{"a": ', "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    caplog.set_level(logging.INFO)
    await app(scope, receive, send)
    assert sent == []  # nobody to answer
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert (
        metrics.registry.get_sample_value(
            "convai_gateway_http_requests_total", {"method": "POST", "route": "/echo", "status": "499"}
        )
        == 1
    )

"""`convai-gateway serve`: workers share metrics and logs, SIGTERM lets requests finish, slow headers are cut off."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.dev_tokens import mint_token
from service.server_protocol import MAX_HEADER_BYTES, MAX_HEADER_COUNT
from tests.conftest import EMULATOR_API_KEY
from tests.support.gateway import TEST_JWT_SECRET, gateway_env
from tests.support.servers import child_pids, free_port, is_running, kill_process_group

ALLOWED_ORIGIN = "https://app.example"


@dataclass
class Served:
    """A running `serve --workers 2` process."""

    base: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self) -> int:
        """Send SIGTERM and return the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=20)


def wait_until_ready(base: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Wait until the served gateway answers /readyz, failing if the process exits first."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, "serve exited early"
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "serve never became ready"
        time.sleep(0.05)  # polling a child process's start-up


@pytest.fixture
def served(emulator_url: str, redis_url: str, tmp_path: Path) -> Iterator[Served]:
    """Yield `convai-gateway serve --workers 2` running as a subprocess against the emulator and Redis."""
    with serving(emulator_url, redis_url, tmp_path, workers=2) as running:
        yield running


@contextlib.contextmanager
def serving(
    emulator_url: str, redis_url: str, tmp_path: Path, *, workers: int, **extra_env: str
) -> Iterator[Served]:
    """Run `convai-gateway serve` with `workers` against the emulator and Redis until the block ends."""
    port = free_port()
    log_path = tmp_path / "serve.log"
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("ELEVENLABS_", "JWT_", "REDIS_", "PROMETHEUS_"))
        },
        **gateway_env(
            emulator_url,
            EMULATOR_API_KEY,
            redis_url,
            LOG_LEVEL="INFO",
            REQUEST_HEADER_TIMEOUT_SECONDS="1",
            CORS_ALLOWED_ORIGINS=ALLOWED_ORIGIN,
            **extra_env,
        ),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }
    (tmp_path / "metrics").mkdir()
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service",
                "serve",
                "--port",
                str(port),
                "--workers",
                str(workers),
                "--graceful-timeout",
                "15",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            start_new_session=True,  # its own process group, so that teardown reaches the workers too
        )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until_ready(base, process)
            yield Served(base, process, log_path)
        finally:
            kill_process_group(process)


def test_workers_share_one_set_of_metrics(served: Served) -> None:
    for _ in range(40):
        # A fresh connection each time, so the kernel spreads requests over both workers.
        assert httpx.get(f"{served.base}/healthz").status_code == 200
    text = httpx.get(f"{served.base}/metrics").text
    total = sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "convai_gateway_http_requests"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels.get("route") == "/healthz"
    )
    assert total == 40


def test_workers_write_structured_access_logs(served: Served) -> None:
    for _ in range(10):
        assert httpx.get(f"{served.base}/healthz").status_code == 200
    assert served.stop() == 0
    lines = [json.loads(line) for line in served.log_path.read_text().splitlines() if line.startswith("{")]
    access = [
        line for line in lines if line["logger"] == "convai_gateway.access" and line["route"] == "/healthz"
    ]
    assert len(access) == 10


def slow_next_list(emulator_url: str, delay: float) -> None:
    """Make the emulator answer the next conversation list after `delay` s, and forget its recorded requests."""
    httpx.post(
        f"{emulator_url}/_emulator/faults",
        json={"endpoint": "list", "kind": "slow", "delay_seconds": delay, "times": 1},
    ).raise_for_status()
    httpx.delete(f"{emulator_url}/_emulator/requests").raise_for_status()


def slow_list_in_flight(
    emulator_url: str, base: str, delay: float
) -> tuple[threading.Thread, dict[str, Any]]:
    """Start a history listing whose upstream answers after `delay` s; return once upstream has received it."""
    slow_next_list(emulator_url, delay)
    token = mint_token(TEST_JWT_SECRET, "alice")
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["response"] = httpx.get(
                f"{base}/v1/convai/conversations", headers={"Authorization": f"Bearer {token}"}, timeout=30
            )
        except httpx.HTTPError as exc:
            result["error"] = repr(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 10
    # Condition wait: the request is in flight once the upstream has received it.
    while not httpx.get(f"{emulator_url}/_emulator/requests").json():
        assert time.monotonic() < deadline, "request never reached upstream"
        time.sleep(0.02)
    return thread, result


def test_sigterm_lets_in_flight_requests_finish(served: Served, emulator_url: str) -> None:
    thread, result = slow_list_in_flight(emulator_url, served.base, 1.5)
    exit_status = served.stop()
    thread.join(timeout=20)
    assert result["response"].status_code == 200, result
    assert exit_status == 0


def _read_until_closed(sock: socket.socket) -> bytes:
    """Return everything the server sends until it closes the connection (the socket timeout bounds the wait)."""
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received


def _read_response(sock: socket.socket) -> bytes:
    """Read one complete response (headers and a Content-Length body) from a kept-alive connection."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(4096)
        assert chunk, "the server closed a healthy keep-alive connection"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    [length] = [
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    ]
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, "the server closed the connection mid-response"
        body += chunk
    return head + b"\r\n\r\n" + body


def _connect(served: Served) -> socket.socket:
    port = int(served.base.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def test_request_headers_that_never_complete_get_408_and_the_connection_closed(served: Served) -> None:
    with _connect(served) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Slow: ")
        # REQUEST_HEADER_TIMEOUT_SECONDS=1 here; the socket's own timeout (10 s) would raise, not answer.
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
    assert_connection_problem(answer, "request_timeout")


def test_a_connection_that_sends_nothing_is_closed(served: Served) -> None:
    with _connect(served) as sock:
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer


def test_each_kept_alive_request_gets_its_own_header_deadline(served: Served) -> None:
    with _connect(served) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
        first = _read_response(sock)
        assert first.startswith(b"HTTP/1.1 200 "), first
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gat")
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer


def test_bytes_that_begin_no_request_start_the_header_deadline(served: Served) -> None:
    # A lone CRLF cancels uvicorn's keep-alive timer without beginning a request: it once held the
    # connection open for good.
    with _connect(served) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
        assert _read_response(sock).startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"\r\n")
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer


def test_oversized_header_block_gets_431_and_the_connection_closed(served: Served) -> None:
    with _connect(served) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Pad: " + b"a" * (MAX_HEADER_BYTES + 1024))
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), answer[:100]
    assert_connection_problem(answer, "request_headers_too_large")


def test_header_block_limit_holds_when_it_arrives_in_one_read(served: Served) -> None:
    # Counted as parsed, not per read: a block just over the limit sent whole is refused too.
    with _connect(served) as sock:
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Pad: " + b"a" * MAX_HEADER_BYTES + b"\r\n\r\n"
        )
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]


def test_unparsable_request_gets_a_400_problem(served: Served) -> None:
    with _connect(served) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost gateway\r\n\r\n")  # a header line without a colon
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer[:100]
    assert_connection_problem(answer, "bad_request")


@pytest.mark.parametrize(
    ("request_head", "status", "code"),
    [
        # A reviewer saw uvicorn's plain-text "400 Invalid HTTP request received." for a ~100 KB URL.
        (
            b"GET /healthz?q=" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: gateway\r\n\r\n",
            431,
            "request_headers_too_large",
        ),
        # A 65,536-byte target alone fits the 64 KiB block but not httptools' URL parser (at most 65,535 bytes):
        # it was a 400 "not valid HTTP/1.1", although the request is merely too large.
        (
            b"GET /healthz?q=" + b"a" * (MAX_HEADER_BYTES - len(b"/healthz?q=")) + b" HTTP/1.1\r\n\r\n",
            431,
            "request_headers_too_large",
        ),
        (
            b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Pad: " + b"a" * 100_000 + b"\r\n\r\n",
            431,
            "request_headers_too_large",
        ),
        (b"GET /healthz HTTP/1.1\r\n" + b"X-H: v\r\n" * 200 + b"\r\n", 431, "request_headers_too_large"),
        (b"GARBAGE\r\n\r\n", 400, "bad_request"),  # a malformed request line
        (b"GET /a b HTTP/1.1\r\nHost: gateway\r\n\r\n", 400, "bad_request"),  # a space in the target
        (b"GET /healthz HTTP/9.9\r\nHost: gateway\r\n\r\n", 400, "bad_request"),  # no such version
    ],
    ids=["url-100KB", "url-64KiB", "header-100KB", "200-headers", "garbage", "space-in-target", "version"],
)
def test_oversized_and_malformed_requests_get_a_problem(
    served: Served, request_head: bytes, status: int, code: str
) -> None:
    with _connect(served) as sock:
        sock.sendall(request_head)
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    assert_connection_problem(answer, code)


def assert_connection_problem(answer: bytes, code: str) -> None:
    """Check a refusal written below the app has the app's error shape: problem body, id, headers, close."""
    head, _, body = answer.partition(b"\r\n\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
    }
    assert headers[b"content-type"] == b"application/problem+json"
    assert headers[b"connection"] == b"close"
    assert headers[b"cache-control"] == b"no-store"
    assert headers[b"x-content-type-options"] == b"nosniff"
    assert len(headers[b"x-request-id"]) == 32
    assert json.loads(body)["code"] == code


# A value no log line may ever show: it stands for a token or any other header value of the refused request.
OPAQUE = "opaque-" + secrets.token_hex(16)


@dataclass(frozen=True)
class Refused:
    """A request refused below the app, and what its access-log line must say."""

    request: bytes
    status: int
    method: str


REFUSED = {
    # Sent in reads until the block passes the limit (counted per read).
    "431-streamed": Refused(
        b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer %s\r\nX-Pad: " % OPAQUE.encode()
        + b"a" * (MAX_HEADER_BYTES + 1024),
        431,
        "GET",
    ),
    # Complete, with too many header lines (refused once the headers end).
    "431-header-lines": Refused(
        b"POST /v1/convai/conversations/c/feedback HTTP/1.1\r\nAuthorization: Bearer %s\r\n" % OPAQUE.encode()
        + b"X-H: v\r\n" * (MAX_HEADER_COUNT + 1)
        + b"\r\n",
        431,
        "POST",
    ),
    "400-header-line": Refused(
        b"GET /healthz HTTP/1.1\r\nAuthorization: Bearer %s\r\nHost gateway\r\n\r\n" % OPAQUE.encode(),
        400,
        "GET",
    ),
    "400-request-line": Refused(b"%s /healthz HTTP/1.1\r\n\r\n" % OPAQUE.encode(), 400, "OTHER"),
    "408-headers": Refused(
        b"DELETE /v1/convai/conversations/c HTTP/1.1\r\nAuthorization: Bearer %s\r\nX-Slow: "
        % OPAQUE.encode(),
        408,
        "DELETE",
    ),
    "408-nothing": Refused(b"", 408, "OTHER"),
}


def _refusals_counted(served: Served, status: int) -> float:
    """Return convai_gateway_http_requests_total{route="unmatched", status=...} summed over methods."""
    return _unmatched_count(httpx.get(f"{served.base}/metrics").text, status)


def _unmatched_count(text: str, status: int) -> float:
    """Return the route="unmatched" request count with `status` in a /metrics exposition `text`."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "convai_gateway_http_requests"
        for sample in family.samples
        if sample.name.endswith("_total")
        and sample.labels["route"] == "unmatched"
        and sample.labels["status"] == str(status)
    )


def _refuse(served: Served, request: bytes) -> tuple[dict[bytes, bytes], bytes]:
    """Send `request` on a fresh connection; return the refusal's headers (lower-case names) and whole answer."""
    with _connect(served) as sock:
        sock.sendall(request)
        answer = _read_until_closed(sock)
    head = answer.partition(b"\r\n\r\n")[0]
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
    }
    return headers, answer


def _access_lines(served: Served, request_id: str) -> list[dict[str, Any]]:
    """Return the access-log lines written so far that carry `request_id`."""
    # A refusal's line is written before its bytes: once the client has read them, the line is in the file.
    lines = [json.loads(line) for line in served.log_path.read_text().splitlines() if line.startswith("{")]
    return [
        line
        for line in lines
        if line["logger"] == "convai_gateway.access" and line.get("request_id") == request_id
    ]


@pytest.mark.parametrize("case", REFUSED.values(), ids=REFUSED.keys())
def test_refusals_below_the_app_are_logged_and_counted_like_requests(served: Served, case: Refused) -> None:
    before = _refusals_counted(served, case.status)
    headers, answer = _refuse(served, case.request)
    assert answer.startswith(b"HTTP/1.1 %d " % case.status), answer[:100]
    request_id = headers[b"x-request-id"].decode()
    [line] = _access_lines(served, request_id)
    assert line["msg"] == "request"
    assert line["method"] == case.method
    assert line["route"] == "unmatched"
    assert line["status"] == case.status
    assert line["client_ip"] == "127.0.0.1"
    assert line["user"] is None
    if case.status == 408:
        assert line["duration_ms"] >= 1000  # REQUEST_HEADER_TIMEOUT_SECONDS=1
    else:
        assert 0 <= line["duration_ms"] < 1000
    assert _refusals_counted(served, case.status) == before + 1
    assert OPAQUE not in served.log_path.read_text()


def test_refusal_keeps_an_offered_request_id_and_replaces_an_invalid_one(served: Served) -> None:
    pad = b"X-Pad: " + b"a" * (MAX_HEADER_BYTES + 1024)
    kept, _ = _refuse(served, b"GET /healthz HTTP/1.1\r\nX-Request-ID: trace-42.a_b\r\n" + pad)
    invalid = b"GET /healthz HTTP/1.1\r\nX-Request-ID: %s/not valid\r\n" % OPAQUE.encode()
    replaced, _ = _refuse(served, invalid + pad)
    assert kept[b"x-request-id"] == b"trace-42.a_b"
    assert len(_access_lines(served, "trace-42.a_b")) == 1
    assert len(replaced[b"x-request-id"]) == 32
    assert len(_access_lines(served, replaced[b"x-request-id"].decode())) == 1
    assert OPAQUE not in served.log_path.read_text()


def _cors(headers: dict[bytes, bytes]) -> dict[bytes, bytes]:
    return {
        name: value
        for name, value in headers.items()
        if name.startswith(b"access-control-") or name == b"vary"
    }


@pytest.mark.parametrize(
    "origin", [ALLOWED_ORIGIN, "https://evil.example", None], ids=["allowed", "other", "none"]
)
def test_a_refusal_carries_the_cors_headers_the_app_gives_the_same_origin(
    served: Served, origin: str | None
) -> None:
    # A browser script that sent an oversized token reads its 431 (and the request id) instead of a network
    # error, under exactly the app's origin policy.
    origin_line = b"" if origin is None else b"Origin: %s\r\n" % origin.encode()
    app_answer = httpx.get(f"{served.base}/nowhere", headers={} if origin is None else {"Origin": origin})
    app_headers = {name.encode(): value.encode() for name, value in app_answer.headers.items()}
    refused, answer = _refuse(
        served,
        b"GET /nowhere HTTP/1.1\r\nHost: gateway\r\n" + origin_line + b"X-Pad: " + b"a" * MAX_HEADER_BYTES,
    )
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    assert _cors(refused) == _cors(app_headers)
    if origin == ALLOWED_ORIGIN:
        assert refused[b"access-control-allow-origin"] == ALLOWED_ORIGIN.encode()
        assert b"x-request-id" in refused[b"access-control-expose-headers"].lower()
    else:
        assert b"access-control-allow-origin" not in refused


def test_a_request_pipelined_behind_a_refused_one_is_never_served(served: Served, emulator_url: str) -> None:
    # The refusal closes the connection, so nothing read after it may reach the app: a DELETE pipelined there
    # would run although its client is told the connection ended before it.
    slow_next_list(emulator_url, 0.5)
    token = mint_token(TEST_JWT_SECRET, "alice").encode()
    listing = (
        b"GET /v1/convai/conversations HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer %s\r\n" % token
    )
    too_many = b"".join(b"X-H%d: v\r\n" % index for index in range(MAX_HEADER_COUNT + 1))
    after = "after-" + secrets.token_hex(8)
    with _connect(served) as sock:
        # One write: the first request is in flight (its response slow) when the other two are parsed.
        sock.sendall(
            listing
            + b"\r\n"
            + b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n"
            + too_many
            + b"\r\n"
            + listing
            + b"X-Request-ID: %s\r\n\r\n" % after.encode()
        )
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
    assert answer.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 431 " in answer, answer
    assert served.stop() == 0
    assert _access_lines(served, after) == []
    assert len(httpx.get(f"{emulator_url}/_emulator/requests").json()) == 1


def test_a_refusal_before_a_request_body_logs_no_parser_warning(served: Served) -> None:
    # The request is well formed: "Invalid HTTP request received." would be a false alarm any client could repeat.
    too_many = b"".join(b"X-H%d: v\r\n" % index for index in range(MAX_HEADER_COUNT + 1))
    _, answer = _refuse(
        served,
        b"POST /v1/convai/conversations/c/feedback HTTP/1.1\r\nHost: gateway\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\n" + too_many + b"\r\n{}",
    )
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    assert served.stop() == 0
    lines = [json.loads(line) for line in served.log_path.read_text().splitlines() if line.startswith("{")]
    assert [line["msg"] for line in lines if line["level"] != "INFO"] == []


def test_too_many_header_lines_get_431(served: Served) -> None:
    lines = b"".join(b"X-H%d: v\r\n" % index for index in range(MAX_HEADER_COUNT + 1))
    with _connect(served) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n" + lines + b"\r\n")
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    with _connect(served) as sock:  # at the limit, the request is served
        sock.sendall(b"GET /healthz HTTP/1.1\r\n" + lines.split(b"\r\n", 1)[1] + b"\r\n")
        assert _read_response(sock).startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize(
    ("length", "status"),
    [(10_000_000, b"413"), (1_000, b"401")],  # too large to read; refused before the body is read (no token)
)
def test_answer_before_the_body_closes_the_connection(served: Served, length: int, status: bytes) -> None:
    # Kept alive, the server would drop the unread body for as long as the client trickles it.
    with _connect(served) as sock:
        sock.sendall(
            b"POST /v1/convai/conversations/conv_1/feedback HTTP/1.1\r\nHost: gateway\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n{" % length
        )
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer[:100]
    assert b"\r\nconnection: close\r\n" in answer.lower()


def test_websocket_upgrades_are_answered_as_http_and_their_query_is_never_logged(served: Served) -> None:
    # The gateway serves no WebSocket. With uvicorn's WebSocket protocol on, an upgrade bypassed the app's
    # access log and uvicorn logged its raw path and query ("WebSocket /path?token=..." 403) at INFO; a token
    # of no known shape (a WebRTC token) went out unmasked.
    opaque = "opaque-" + secrets.token_hex(16)
    with _connect(served) as sock:
        sock.sendall(
            b"GET /v1/convai/conversations?token=%s HTTP/1.1\r\nHost: gateway\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n" % opaque.encode()
        )
        answer = _read_response(sock)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:100]
    assert served.stop() == 0
    log = served.log_path.read_text()
    assert opaque not in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    access = [(line["route"], line["status"]) for line in lines if line["logger"] == "convai_gateway.access"]
    assert access[-1] == ("/v1/convai/conversations", 401)
    assert [line["msg"] for line in lines if line["level"] == "WARNING"] == []


def test_a_request_over_max_connections_gets_503_and_its_connection_closed(
    emulator_url: str, redis_url: str, tmp_path: Path
) -> None:
    # One worker, so every connection counts against the same process's limit; kept-alive connections count too.
    with (
        serving(
            emulator_url, redis_url, tmp_path, workers=1, MAX_CONNECTIONS="2", KEEP_ALIVE_TIMEOUT_SECONDS="60"
        ) as served,
        _connect(served) as first,
        _connect(served) as second,
    ):
        for held in (first, second):
            held.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
            assert _read_response(held).startswith(b"HTTP/1.1 200 ")
        before = _refusals_counted_on(first, 503)
        # A flood of new connections must not take the held ones down: while an idle one opened over the limit
        # is open, the held connections are still served (the round trip on `second` lets the server accept it).
        flood = _connect(served)
        for held in (second, first):
            held.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
            assert _read_response(held).startswith(b"HTTP/1.1 200 ")
        flood.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
        assert _read_until_closed(flood).startswith(b"HTTP/1.1 503 ")
        flood.close()
        refused, answer = _refuse(
            served, b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nOrigin: %s\r\n\r\n" % ALLOWED_ORIGIN.encode()
        )
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:100]
        assert_connection_problem(answer, "too_many_connections")
        assert refused[b"retry-after"] == b"1"
        assert refused[b"access-control-allow-origin"] == ALLOWED_ORIGIN.encode()
        [line] = _access_lines(served, refused[b"x-request-id"].decode())
        assert (line["status"], line["route"], line["method"]) == (503, "unmatched", "GET")
        # The kept-alive connections are still served (the count is read on one), the refused one counted once.
        assert _refusals_counted_on(first, 503) == before + 2
        # Once a connection closes, a new one is served again.
        second.close()
        deadline = time.monotonic() + 10
        while (
            status := httpx.get(f"{served.base}/healthz").status_code
        ) == 503 and time.monotonic() < deadline:
            time.sleep(0.05)  # the server notices the close on its next loop turn
        assert status == 200


def _refusals_counted_on(sock: socket.socket, status: int) -> float:
    """Read /metrics on a kept-alive connection (a new one could be over the limit) and count refusals."""
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: gateway\r\n\r\n")
    answer = _read_response(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
    return _unmatched_count(answer.partition(b"\r\n\r\n")[2].decode(), status)


def test_a_client_gone_before_a_plain_response_is_logged_499(served: Served, emulator_url: str) -> None:
    # A JSON route never reads `receive` after its body, and uvicorn drops what is sent to a closed connection
    # without an error: only the server knows the client left. The line must say so, as nginx's 499 does.
    slow_next_list(emulator_url, 1.0)
    request_id = "gone-" + secrets.token_hex(8)
    token = mint_token(TEST_JWT_SECRET, "alice")
    with _connect(served) as sock:
        sock.sendall(
            b"GET /v1/convai/conversations HTTP/1.1\r\nHost: gateway\r\nX-Request-ID: %s\r\n"
            b"Authorization: Bearer %s\r\n\r\n" % (request_id.encode(), token.encode())
        )
        deadline = time.monotonic() + 10
        while not httpx.get(f"{emulator_url}/_emulator/requests").json():
            assert time.monotonic() < deadline, "request never reached upstream"
            time.sleep(0.02)  # condition wait: the request is in flight once upstream has it
    deadline = time.monotonic() + 10
    while not (lines := _access_lines(served, request_id)):
        assert time.monotonic() < deadline, "no access line for the abandoned request"
        time.sleep(0.02)  # the line is written when the slow upstream answers
    [line] = lines
    assert line["status"] == 499
    assert line["client_disconnected"] is True
    assert line["route"] == "/v1/convai/conversations"


def test_serving_leaves_no_worker_behind(emulator_url: str, redis_url: str, tmp_path: Path) -> None:
    # The tests' own hygiene: a supervisor killed alone orphaned its workers, and a day of test runs filled memory.
    with serving(emulator_url, redis_url, tmp_path, workers=2) as served:
        deadline = time.monotonic() + 10
        while len(workers := child_pids(served.process.pid)) < 2:
            assert time.monotonic() < deadline, "serve never started its workers"
            time.sleep(0.05)  # polling a child process's start-up
    deadline = time.monotonic() + 10
    while alive := [pid for pid in workers if is_running(pid)]:
        assert time.monotonic() < deadline, f"workers left behind: {alive}"
        time.sleep(0.05)  # condition wait: the kernel reaps orphans through init


def _log_lines(served: Served) -> list[dict[str, Any]]:
    return [json.loads(line) for line in served.log_path.read_text().splitlines() if line.startswith("{")]


def test_a_response_cut_short_is_logged_with_its_request_id_on_every_line(
    served: Served, emulator_url: str
) -> None:
    # An upstream audio stream that fails once the headers went out: the gateway can only cut the body short,
    # and uvicorn then logs an ERROR of its own, after the app (and its request context) returned.
    created = httpx.post(f"{emulator_url}/_emulator/conversations", json={"user_id": "alice"})
    conversation_id = created.json()["conversation_id"]
    httpx.post(
        f"{emulator_url}/_emulator/faults", json={"endpoint": "audio", "kind": "drop"}
    ).raise_for_status()
    request_id = "cut-" + secrets.token_hex(8)
    token = mint_token(TEST_JWT_SECRET, "alice")
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(
            f"{served.base}/v1/convai/conversations/{conversation_id}/audio",
            headers={"Authorization": f"Bearer {token}", "X-Request-ID": request_id},
        )
    deadline = time.monotonic() + 10
    while not (errors := [line for line in _log_lines(served) if line["level"] == "ERROR"]):
        assert time.monotonic() < deadline, "uvicorn never logged the incomplete response"
        time.sleep(0.02)  # polling a child process's log file
    assert [line["msg"] for line in errors] == ["ASGI callable returned without completing response."]
    lines = _log_lines(served)
    about_it = [line for line in lines if line["level"] in ("WARNING", "ERROR")]
    assert {line.get("request_id") for line in about_it} == {request_id}, about_it
    [access] = _access_lines(served, request_id)
    assert (access["status"], access["incomplete"]) == (200, True)
    text = served.log_path.read_text()
    assert token not in text and EMULATOR_API_KEY not in text

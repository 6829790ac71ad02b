"""`convai-gateway serve` lifecycle: exit status on SIGTERM, requests cut off at the graceful timeout, the
listening socket during a multi-worker drain, and start-up failures that must be one clear line, no traceback."""

from __future__ import annotations

import json
import os
import re
import resource
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.dev_tokens import mint_token
from service.healthcheck import healthz_url
from tests.conftest import EMULATOR_API_KEY
from tests.support.gateway import TEST_JWT_SECRET, gateway_env
from tests.support.servers import free_port, kill_process_group
from tests.test_serve import _read_response, _read_until_closed, slow_list_in_flight, wait_until_ready

LIST = "/v1/convai/conversations"


def serve_env(emulator_url: str, redis_url: str, tmp_path: Path, **overrides: str) -> dict[str, str]:
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("ELEVENLABS_", "JWT_", "REDIS_", "PROMETHEUS_", "METRICS_"))
        },
        **gateway_env(emulator_url, EMULATOR_API_KEY, redis_url, LOG_LEVEL="INFO", **overrides),
    }
    return env


class Serve:
    """A `convai-gateway serve` subprocess whose stderr goes to a file."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        log_path: Path,
        *,
        open_files: tuple[int, int] | None = None,
    ) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("wb")

        def limit_open_files() -> None:
            # Runs in the child before exec: as a system that starts services at a low open-file limit would.
            if open_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, open_files)

        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(self.port), *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            preexec_fn=limit_open_files,
            start_new_session=True,  # its own process group, so that close() reaches the workers too
        )

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]

    def wait_for_log(
        self, predicate: Callable[[dict[str, Any]], bool], count: int = 1, timeout: float = 20
    ) -> None:
        deadline = time.monotonic() + timeout
        while sum(1 for line in self.log_lines() if predicate(line)) < count:
            assert time.monotonic() < deadline, "expected log line never appeared"
            time.sleep(0.02)  # polling a child process's log file

    def close(self) -> None:
        kill_process_group(self.process)
        self._log.close()


StartServe = Callable[..., Serve]


@pytest.fixture
def start_serve(emulator_url: str, redis_url: str, tmp_path: Path) -> Iterator[StartServe]:
    started: list[Serve] = []

    def start(*args: str, **overrides: str) -> Serve:
        served = Serve(
            list(args), serve_env(emulator_url, redis_url, tmp_path, **overrides), tmp_path / "serve.log"
        )
        started.append(served)
        wait_until_ready(served.base, served.process)
        return served

    yield start
    for served in started:
        served.close()


def test_single_worker_sigterm_finishes_in_flight_requests_and_exits_0(
    start_serve: StartServe, emulator_url: str
) -> None:
    # The container image and the Helm chart (workers: 1) run one worker: every pod stop goes through this.
    served = start_serve("--graceful-timeout", "15")
    thread, result = slow_list_in_flight(emulator_url, served.base, 1.0)
    served.process.send_signal(signal.SIGTERM)
    status = served.process.wait(timeout=20)
    thread.join(timeout=20)
    response = result["response"]
    assert isinstance(response, httpx.Response) and response.status_code == 200
    assert status == 0, f"serve exited with {status} after a graceful SIGTERM"


def test_a_request_cut_off_at_the_graceful_timeout_gets_a_problem_and_no_error_traceback(
    start_serve: StartServe, emulator_url: str
) -> None:
    served = start_serve("--graceful-timeout", "1")
    thread, result = slow_list_in_flight(emulator_url, served.base, 8.0)
    served.process.send_signal(signal.SIGTERM)
    served.process.wait(timeout=20)
    thread.join(timeout=20)
    response = result["response"]
    assert isinstance(response, httpx.Response)
    # Contract: every error body is a problem, with the request id and security headers; a shutdown is not a
    # server bug (no 500, which pages whoever watches the 5xx rate on every deploy).
    assert response.status_code == 503, (
        response.status_code,
        response.headers.get("content-type"),
        response.text,
    )
    assert response.headers["content-type"] == "application/problem+json"
    assert "x-request-id" in response.headers
    tracebacks = [
        line for line in served.log_lines() if line["msg"].startswith("Exception in ASGI application")
    ]
    assert tracebacks == []


def test_an_audio_stream_cut_off_at_the_graceful_timeout_is_logged_with_its_request_id(
    start_serve: StartServe, emulator_url: str
) -> None:
    # Its headers went out, so the cancellation at the graceful timeout reaches uvicorn, which logs the
    # traceback itself, after the app (and its request context) returned: that line must name the request too.
    created = httpx.post(
        f"{emulator_url}/_emulator/conversations", json={"user_id": "alice", "audio_size_bytes": 32 << 20}
    )
    conversation_id = created.json()["conversation_id"]
    served = start_serve("--graceful-timeout", "1")
    request_id = "stalled-" + secrets.token_hex(8)
    token = mint_token(TEST_JWT_SECRET, "alice")
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        sock.sendall(
            b"GET /v1/convai/conversations/%s/audio HTTP/1.1\r\nHost: gateway\r\nX-Request-ID: %s\r\n"
            b"Authorization: Bearer %s\r\n\r\n"
            % (conversation_id.encode(), request_id.encode(), token.encode())
        )
        # The listener reads the headers, then nothing more: the stream is in flight when shutdown begins.
        assert sock.recv(16).startswith(b"HTTP/1.1 200")
        served.process.send_signal(signal.SIGTERM)
        served.process.wait(timeout=20)
    # uvicorn's "Cancel 1 running task(s)" ERROR is about the server, not a request: it names none.
    errors = [line for line in served.log_lines() if line["msg"].startswith("Exception in ASGI application")]
    assert [(line["level"], line.get("request_id")) for line in errors] == [("ERROR", request_id)]
    [access] = [
        line
        for line in served.log_lines()
        if line["logger"] == "convai_gateway.access" and line["request_id"] == request_id
    ]
    assert (access["status"], access["incomplete"]) == (200, True)
    text = served.log_path.read_text()
    assert token not in text and EMULATOR_API_KEY not in text


def test_new_connections_are_refused_while_workers_drain(start_serve: StartServe, emulator_url: str) -> None:
    served = start_serve("--workers", "2", "--graceful-timeout", "15")
    thread, _ = slow_list_in_flight(emulator_url, served.base, 6.0)
    served.process.send_signal(signal.SIGTERM)
    # Both workers have stopped accepting (one still finishes the in-flight request).
    served.wait_for_log(lambda line: line["msg"] == "Shutting down", count=2)
    outcome = "accepted"
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", served.port), timeout=1) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
                sock.settimeout(1)
                outcome = "answered" if sock.recv(16) else "closed"
        except ConnectionRefusedError:
            outcome = "refused"
            break
        except TimeoutError:
            outcome = "accepted, then hung"
    thread.join(timeout=20)
    served.process.wait(timeout=20)
    # Nobody will ever serve these: the parent's listening socket must close so clients fail over at once.
    assert outcome == "refused"


def _serve_once(env: dict[str, str], *args: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-m", "service", "serve", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"serve {' '.join(args)} kept running instead of refusing to start: {exc.stderr!r}"[:600])


@pytest.mark.parametrize("port", ["70000", "-5"])
def test_serve_refuses_an_out_of_range_port_like_PORT(
    emulator_url: str, redis_url: str, tmp_path: Path, port: str
) -> None:
    # PORT=70000 is refused with exit 2; `--port 70000` silently listened on 70000 % 65536 = 4464.
    result = _serve_once(serve_env(emulator_url, redis_url, tmp_path), "--port", port)
    assert result.returncode == 2
    assert "--port" in result.stderr and "Traceback" not in result.stderr


def test_a_metrics_port_in_use_is_one_clear_line_without_traceback(
    emulator_url: str, redis_url: str, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics_port = taken.getsockname()[1]
        env = serve_env(emulator_url, redis_url, tmp_path, METRICS_PORT=str(metrics_port))
        result = _serve_once(env, "--port", str(free_port()))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-400:]
    assert "METRICS_PORT" in result.stderr


def test_the_metrics_port_of_a_single_worker_reports_its_process(start_serve: StartServe) -> None:
    # The chart's default (one worker, METRICS_PORT): the listener runs in the serving process, and an
    # operator's memory, CPU and file-descriptor alerts need that process's own metrics.
    metrics_port = free_port()
    served = start_serve(METRICS_PORT=str(metrics_port))
    assert httpx.get(f"{served.base}/healthz").status_code == 200
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    for name in ("process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds", "python_info"):
        assert name in families, f"{name} missing from the metrics port"
    (fds,) = families["process_open_fds"].samples
    assert fds.value > 0
    requests = families["convai_gateway_http_requests"].samples
    assert any(s.labels.get("route") == "/healthz" and s.name.endswith("_total") for s in requests)


def test_a_second_gateway_cannot_share_a_metrics_directory_in_use(
    start_serve: StartServe, emulator_url: str, redis_url: str, tmp_path: Path
) -> None:
    # Each scrape adds up every file in the directory: two gateways writing into one would each report both
    # gateways' traffic, and every dashboard would double-count without a sign of it.
    shared = tmp_path / "metrics"
    shared.mkdir()
    first = start_serve(PROMETHEUS_MULTIPROC_DIR=str(shared))
    assert httpx.get(f"{first.base}/healthz").status_code == 200
    env = serve_env(emulator_url, redis_url, tmp_path, PROMETHEUS_MULTIPROC_DIR=str(shared))
    result = _serve_once(env, "--port", str(free_port()))
    assert result.returncode == 2, result.stderr[-400:]
    assert "PROMETHEUS_MULTIPROC_DIR" in result.stderr and "Traceback" not in result.stderr
    first.close()
    # Once the first gateway is gone, the directory is free again (a restarted container reuses it).
    again = start_serve(PROMETHEUS_MULTIPROC_DIR=str(shared))
    assert httpx.get(f"{again.base}/healthz").status_code == 200


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_unusable_metrics_directory_is_one_clear_line_not_a_traceback_or_a_crash_loop(
    emulator_url: str, redis_url: str, tmp_path: Path, workers: str
) -> None:
    # A PROMETHEUS_MULTIPROC_DIR that does not exist: each worker's factory raised FileNotFoundError; with
    # --workers 2 the supervisor restarted them forever (never ready, never exiting).
    env = serve_env(emulator_url, redis_url, tmp_path)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "missing")
    result = _serve_once(env, "--port", str(free_port()), "--workers", workers, timeout=20)
    assert result.returncode == 2
    assert "PROMETHEUS_MULTIPROC_DIR" in result.stderr
    assert "Traceback" not in result.stderr


def _get(sock: socket.socket) -> bytes:
    """Send one GET /healthz on a kept-alive connection and return its complete response."""
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
    return _read_response(sock)


@pytest.mark.parametrize("how", ["option", "environment"])
def test_an_idle_connection_is_closed_at_the_configured_keep_alive_timeout(
    start_serve: StartServe, how: str
) -> None:
    # Ordered on the server's one event loop, not timed: A goes idle before B connects, so A's 1 s keep-alive
    # timer runs out before B's 1 s header deadline; by the time B's 408 has ended, A has been closed.
    if how == "option":
        served = start_serve("--keep-alive-timeout", "1", REQUEST_HEADER_TIMEOUT_SECONDS="1")
    else:
        served = start_serve(KEEP_ALIVE_TIMEOUT_SECONDS="1", REQUEST_HEADER_TIMEOUT_SECONDS="1")
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as idle:
        assert _get(idle).startswith(b"HTTP/1.1 200 ")
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as silent:
            assert _read_until_closed(silent).startswith(b"HTTP/1.1 408 ")
        idle.setblocking(False)
        assert idle.recv(4096) == b"", "the idle connection outlived a 1 s keep-alive timeout"


def test_the_default_keep_alive_outlasts_a_one_second_deadline(start_serve: StartServe) -> None:
    # The default (5 s) is kept for a gateway exposed directly: B, connecting after A went idle, is refused at
    # its 1 s header deadline while A stays open and serves a second request.
    served = start_serve(REQUEST_HEADER_TIMEOUT_SECONDS="1")
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as idle:
        assert _get(idle).startswith(b"HTTP/1.1 200 ")
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as silent:
            assert _read_until_closed(silent).startswith(b"HTTP/1.1 408 ")
        assert _get(idle).startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize(
    ("args", "overrides", "fragment"),
    [
        (("--keep-alive-timeout", "0"), {}, "--keep-alive-timeout"),
        (("--keep-alive-timeout", "soon"), {}, "--keep-alive-timeout"),
        ((), {"KEEP_ALIVE_TIMEOUT_SECONDS": "0"}, "KEEP_ALIVE_TIMEOUT_SECONDS: must be between"),
        ((), {"KEEP_ALIVE_TIMEOUT_SECONDS": "a minute"}, "KEEP_ALIVE_TIMEOUT_SECONDS: expected an integer"),
    ],
)
def test_serve_refuses_a_bad_keep_alive_timeout_naming_it(
    emulator_url: str,
    redis_url: str,
    tmp_path: Path,
    args: tuple[str, ...],
    overrides: dict[str, str],
    fragment: str,
) -> None:
    env = serve_env(emulator_url, redis_url, tmp_path, **overrides)
    result = _serve_once(env, "--port", str(free_port()), *args)
    assert result.returncode == 2
    assert fragment in result.stderr and "Traceback" not in result.stderr


def dockerfile_healthcheck() -> list[str]:
    """Return the Dockerfile's HEALTHCHECK command (exec form), run with this interpreter."""
    text = (Path(__file__).resolve().parent.parent / "Dockerfile").read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK\b.*?\bCMD\s+(\[.*\])\s*$", text, re.MULTILINE)
    assert match is not None, "no exec-form HEALTHCHECK in the Dockerfile"
    command: list[str] = json.loads(match.group(1))
    assert command[0] == "python", command
    return [sys.executable, *command[1:]]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_the_image_healthcheck_reaches_serve_on_the_address_it_listens_on(
    emulator_url: str, redis_url: str, tmp_path: Path, host: str
) -> None:
    # The image's HEALTHCHECK called 127.0.0.1 whatever HOST said: with HOST=:: (an IPv6 pod or network) the
    # container was reported unhealthy while it served. Loopback addresses stand in for the wildcards here.
    env = serve_env(emulator_url, redis_url, tmp_path, HOST=host)
    served = Serve([], env, tmp_path / "serve.log")
    try:
        authority = f"[{host}]" if ":" in host else host
        wait_until_ready(f"http://{authority}:{served.port}", served.process)
        env["PORT"] = str(served.port)
        probe = subprocess.run(dockerfile_healthcheck(), env=env, capture_output=True, text=True, timeout=30)
    finally:
        served.close()
    assert probe.returncode == 0, probe.stderr[-600:]


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("0.0.0.0", "http://127.0.0.1:8080/healthz"),  # noqa: S104 - the image's default HOST, not a bind
        ("::", "http://[::1]:8080/healthz"),
        ("", "http://127.0.0.1:8080/healthz"),  # unset: serve's own default
        (" 10.1.2.3 ", "http://10.1.2.3:8080/healthz"),  # a specific address is probed as given
        ("fd00::5", "http://[fd00::5]:8080/healthz"),
    ],
)
def test_the_healthcheck_probes_a_wildcard_bind_over_loopback_of_its_family(host: str, url: str) -> None:
    assert healthz_url({"HOST": host}) == url


def _open_file_limit(pid: int) -> tuple[int, int]:
    """Return a process's (soft, hard) open-file limit as the kernel reports it."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc")


@pytest.mark.parametrize(("max_connections", "warned"), [("1000", False), ("8000", True)])
def test_serve_raises_its_open_file_limit_and_warns_when_max_connections_cannot_fit(
    emulator_url: str, redis_url: str, tmp_path: Path, max_connections: str, warned: bool
) -> None:
    env = serve_env(emulator_url, redis_url, tmp_path, MAX_CONNECTIONS=max_connections)
    served = Serve([], env, tmp_path / "serve.log", open_files=(1024, 4096))
    try:
        wait_until_ready(served.base, served.process)
        assert _open_file_limit(served.process.pid) == (4096, 4096)
        warnings = [line["msg"] for line in served.log_lines() if "MAX_CONNECTIONS" in line["msg"]]
        if warned:
            [warning] = warnings
            assert "MAX_CONNECTIONS 8000" in warning and "only 4096" in warning
        else:
            assert warnings == []
    finally:
        served.close()

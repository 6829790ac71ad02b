"""The command line: exit codes, check-config, token, and `dev` whose printed curl lines work when pasted."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client.parser import text_string_to_metric_families

from service.auth import Authenticator
from service.http_hygiene import listens_on_loopback_only
from service.settings import load_settings
from tests.auth.support import public_pem
from tests.support.dev_command import next_line_with, output_lines, running_dev_command
from tests.support.servers import RedisServer, free_port
from tests.test_serve import assert_connection_problem
from tests.test_server_protocol import read_until_closed

SECRET = "cli-secret-0123456789abcdef0123456789abcdef"
VALID_ENV = {
    "ELEVENLABS_API_KEY": "xi-cli-key",
    "JWT_HS256_SECRET": SECRET,
    "ALLOWED_AGENT_IDS": "agent_demo",
}


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run the convai-gateway command line in a subprocess, without the gateway settings of this environment."""
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("ELEVENLABS_", "JWT_", "REDIS_", "ALLOWED_"))
    }
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_check_config_accepts_a_valid_environment() -> None:
    result = run_cli("check-config", env=VALID_ENV)
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout


def test_check_config_names_the_upstream_without_credentials_or_query() -> None:
    base_url = "https://gateway:upstream-pass-5a4b3c2d1e@api.elevenlabs.io/?sig=query-secret-77"
    result = run_cli("check-config", env={**VALID_ENV, "ELEVENLABS_BASE_URL": base_url})
    assert result.returncode == 0, result.stderr
    assert "upstream https://api.elevenlabs.io/," in result.stdout
    assert "upstream-pass" not in result.stdout + result.stderr
    assert "query-secret" not in result.stdout + result.stderr


def test_check_config_lists_every_problem_and_exits_2() -> None:
    result = run_cli("check-config", env={"OWNERSHIP_MODE": "everyone", "JWT_HS256_SECRET": "short"})
    assert result.returncode == 2
    for name in ("ELEVENLABS_API_KEY", "OWNERSHIP_MODE", "JWT_HS256_SECRET", "ALLOWED_AGENT_IDS"):
        assert name in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_refuses_a_redis_url_path_that_is_no_database_number() -> None:
    url = "redis://:redis-cli-pw-41c7@127.0.0.1:6379/abc"
    result = run_cli("check-config", env={**VALID_ENV, "REDIS_URL": url})
    assert result.returncode == 2
    assert "REDIS_URL: a path must be a database number (0 or more)" in result.stderr
    assert "redis-cli-pw" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


SENTINEL_PASSWORD = "sentinel-cli-pw-3e9a7d1c"


def test_check_config_names_how_the_sentinels_are_reached_without_their_password(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[redis]\nsentinels = ["127.0.0.1:1"]\nsentinel_service = "gwmaster"\n'
        'sentinel_auth = "password"\nsentinel_username = "gw-user"\nsentinel_tls = true\n'
    )
    env = {
        **VALID_ENV,
        "GATEWAY_CONFIG": str(config),
        "REDIS_URL": "rediss://127.0.0.1:1/0",
        "REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD,
    }
    result = run_cli("check-config", env=env)
    assert result.returncode == 0, result.stderr
    assert "sentinel (gwmaster; sentinels: password auth, TLS)" in result.stdout
    assert SENTINEL_PASSWORD not in result.stdout + result.stderr


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_a_sentinel_password_without_sentinel_auth_exits_2_without_showing_it(command: str) -> None:
    result = run_cli(command, env={**VALID_ENV, "REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD})
    assert result.returncode == 2, result.stderr
    assert (
        'REDIS_SENTINEL_PASSWORD: set, but only used with redis.sentinel_auth = "password"' in result.stderr
    )
    assert SENTINEL_PASSWORD not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_a_redis_url_overriding_the_redis_timeout_exits_2_without_its_password(command: str) -> None:
    url = "redis://:redis-url-pass-8c7d@127.0.0.1:1/0?socket_timeout=5"
    result = run_cli(command, env={**VALID_ENV, "REDIS_URL": url})
    assert result.returncode == 2, result.stderr
    assert "REDIS_URL:" in result.stderr and "socket_timeout" in result.stderr
    assert "REDIS_TIMEOUT_MS" in result.stderr
    assert "redis-url-pass" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_a_bad_tls_option_in_redis_url_exits_2_naming_it_without_the_url(command: str) -> None:
    # redis-py took `ssl_cert_reqs=bogus` and failed each connection later; `serve` never got to start either.
    url = "rediss://:redis-url-pass-8c7d@127.0.0.1:1/0?ssl_cert_reqs=bogus&ssl_check_hostname=maybe"
    result = run_cli(command, env={**VALID_ENV, "REDIS_URL": url})
    assert result.returncode == 2, result.stderr
    assert "REDIS_URL: the query option ssl_cert_reqs must be none, optional or required" in result.stderr
    assert "REDIS_URL: the query option ssl_check_hostname must be true or false" in result.stderr
    assert "redis-url-pass" not in result.stdout + result.stderr and "bogus" not in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_without_api_key_exits_2_with_a_clear_error() -> None:
    env = {k: v for k, v in VALID_ENV.items() if k != "ELEVENLABS_API_KEY"}
    result = run_cli("serve", env=env)
    assert result.returncode == 2
    assert "ELEVENLABS_API_KEY: required" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [("serve", "--bogus"), ("token",), ("frobnicate",), ("emulator",)])
def test_unknown_or_missing_arguments_exit_2(args: tuple[str, ...]) -> None:
    result = run_cli(*args, env=VALID_ENV)
    assert result.returncode == 2
    assert "usage:" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("serve", "--port", "70000"),
        ("dev", "--port", "70000"),
        ("dev", "--emulator-port", "0"),
        ("emulator", "--port", "70000"),
        ("emulator", "--port", "-1"),
        ("serve", "--graceful-timeout", "-1"),
    ],
)
def test_out_of_range_ports_and_timeouts_exit_2_with_usage(args: tuple[str, ...]) -> None:
    # README: "out-of-range values (`--port` 1-65535, ...) exit 2 with usage", for every command taking one.
    result = run_cli(*args, env=VALID_ENV, timeout=10)
    assert result.returncode == 2
    assert "usage:" in result.stderr
    assert "must be between" in result.stderr


def test_token_prints_a_jwt_with_the_requested_claims() -> None:
    result = run_cli(
        "token",
        "--sub",
        "bob",
        "--scope",
        "convai:history",
        "--ttl",
        "120",
        "--agents",
        "a1,a2",
        env=VALID_ENV,
    )
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "bob"
    assert claims["scope"] == "convai:history"
    assert claims["agents"] == ["a1", "a2"]
    assert claims["exp"] - claims["iat"] == 120


def test_token_warns_of_scopes_the_gateway_would_drop() -> None:
    env = {**VALID_ENV, "JWT_ALLOWED_SCOPES": "convai:session convai:history"}
    result = run_cli("token", "--sub", "bob", "--scope", "convai:session convai:delete", env=env)
    assert result.returncode == 0, result.stderr
    assert (
        jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])["scope"]
        == "convai:session convai:delete"
    )
    assert "convai:delete" in result.stderr and "JWT_ALLOWED_SCOPES" in result.stderr
    quiet = run_cli("token", "--sub", "bob", "--scope", "convai:history", env=env)
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_token_names_the_user_id_the_gateway_will_see_under_a_prefix() -> None:
    # The gateway puts JWT_USER_ID_PREFIX in front of the sub: "bob" is the user "own:bob" there (its
    # conversations, limits and X-On-Behalf-Of targets), which the token itself does not say.
    result = run_cli("token", "--sub", "bob", env={**VALID_ENV, "JWT_USER_ID_PREFIX": "own:"})
    assert result.returncode == 0, result.stderr
    assert jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])["sub"] == "bob"
    assert (
        result.stderr == "token: the gateway will see user id 'own:bob' (JWT_USER_ID_PREFIX 'own:' + sub)\n"
    )
    unprefixed = run_cli("token", "--sub", "bob", env=VALID_ENV)
    assert unprefixed.returncode == 0 and unprefixed.stderr == ""


def test_token_refuses_a_missing_or_short_secret() -> None:
    result = run_cli("token", "--sub", "bob", env={"JWT_HS256_SECRET": "short"})
    assert result.returncode == 2
    assert "JWT_HS256_SECRET" in result.stderr


async def test_token_from_a_secret_ending_in_a_newline_verifies_at_the_gateway() -> None:
    # Kubernetes Secrets made from files often end in a newline; the gateway strips it, so must `token`.
    env = {
        **VALID_ENV,
        "JWT_HS256_SECRET": SECRET + "\n",
        "JWT_ISSUER": "https://issuer.example\n",
        "JWT_AUDIENCE": "convai-gateway\n",
    }
    result = run_cli("token", "--sub", "alice", env=env)
    assert result.returncode == 0, result.stderr
    authenticator = Authenticator(load_settings(env))
    principal = await authenticator.authenticate(f"Bearer {result.stdout.strip()}")
    assert (principal.user_id, principal.issuer) == ("alice", "https://issuer.example")


def test_serve_refuses_a_weak_public_key_naming_the_variable(tmp_path: Path) -> None:
    key_file = tmp_path / "weak.pem"
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - must be refused
    key_file.write_text(public_pem(weak))
    env = {
        "ELEVENLABS_API_KEY": "xi-cli-key",
        "ALLOWED_AGENT_IDS": "agent_demo",
        "JWT_PUBLIC_KEY_FILE": str(key_file),
        "HOST": "127.0.0.1",
        "PORT": str(free_port()),
    }
    for command in ("check-config", "serve"):
        result = run_cli(command, env=env)
        assert result.returncode == 2, (command, result.stderr)
        assert "JWT_PUBLIC_KEY_FILE" in result.stderr and "RSA 1024 bits" in result.stderr
        assert "Traceback" not in result.stderr


def test_check_config_lists_wrongly_typed_issuer_values_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[[issuers]]\nissuer = "https://a.example"\nhs256_secret_env = "JWT_HS256_SECRET"\naudiences = 5\n'
        "\n[[issuers]]\nissuer = 5\njwks_url = 5\npublic_key_file = 5\n"
    )
    result = run_cli("check-config", env={**VALID_ENV, "GATEWAY_CONFIG": str(config)})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for key in (
        "issuers[0].audiences",
        "issuers[1].issuer",
        "issuers[1].jwks_url",
        "issuers[1].public_key_file",
    ):
        assert f"GATEWAY_CONFIG: {key}: must be" in result.stderr, result.stderr


def test_emulator_runs_in_a_clean_environment_and_names_its_key() -> None:
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ELEVENLABS_", "JWT_", "REDIS_"))}
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "emulator", "--port", str(port)],
        env=clean,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()  # printed before the server starts
        match = re.search(r"accepting xi-api-key (xi-emulator-[0-9a-f]{32})", banner)
        assert match, banner
        url = f"http://127.0.0.1:{port}/v1/convai/conversations"
        deadline = time.monotonic() + 30
        while True:
            try:
                with_key = httpx.get(url, headers={"xi-api-key": match.group(1)}, timeout=2)
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, "emulator never listened"
                time.sleep(0.05)  # polling a child process's start-up
        assert with_key.status_code == 200
        assert httpx.get(url, headers={"xi-api-key": "xi-wrong"}, timeout=2).status_code == 401
    finally:
        process.terminate()
        process.wait(timeout=20)
        assert process.stdout is not None
        process.stdout.close()


def test_emulator_answers_only_requests_addressed_to_a_loopback_name() -> None:
    # Like `dev`'s: on loopback, a page from evil.example whose name then resolves to 127.0.0.1 could otherwise
    # drive the emulator (its control API needs no key) from the developer's browser.
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ELEVENLABS_", "JWT_", "REDIS_"))}
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "emulator", "--port", str(port)],
        env={**clean, "ELEVENLABS_API_KEY": "xi-emulator-host-test"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{base}/_emulator/faults", timeout=2)
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, "emulator never listened"
                time.sleep(0.05)  # polling a child process's start-up
        for host in (
            "evil.example",
            f"evil.example:{port}",
            "127.0.0.1.evil.example",
            "localhost.evil.example",
        ):
            refused = httpx.post(f"{base}/_emulator/reset", json={}, headers={"Host": host}, timeout=10)
            assert refused.status_code == 421, (host, refused.text)
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.json()["code"] == "misdirected_request"
        for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
            listed = httpx.get(
                f"{base}/v1/convai/conversations",
                headers={"Host": host, "xi-api-key": "xi-emulator-host-test"},
                timeout=10,
            )
            assert listed.status_code == 200, host
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"GET /v1/convai/conversation HTTP/1.1\r\nHost: evil.example\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
            answer = read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 403 "), answer[:200]
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.mark.parametrize(
    ("host", "guarded"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True), ("LocalHost", True),
     ("0.0.0.0", False), ("::", False), ("emulator", False), ("192.0.2.10", False)],  # noqa: S104
)  # fmt: skip
def test_emulator_checks_the_host_whenever_it_listens_on_loopback_only(host: str, guarded: bool) -> None:
    # `--host 0.0.0.0` serves other machines by name (docker compose's gateway calls http://emulator:9000).
    assert listens_on_loopback_only(host) is guarded


@pytest.fixture
def dev_process() -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """Yield a running `dev` command and the lines it has printed so far."""
    with running_dev_command() as dev:
        yield dev.process, dev.lines


def test_dev_prints_a_token_and_three_curl_lines_that_work(
    dev_process: tuple[subprocess.Popen[str], list[str]],
) -> None:
    process, lines = dev_process
    exports = [line for line in lines if line.startswith("export TOKEN=")]
    curls = [line for line in lines if line.startswith("curl ")]
    assert len(exports) == 1, lines
    assert len(curls) == 3, lines
    answers: dict[str, object] = {}
    for curl in curls:
        # Paste exactly what was printed into a shell, with the printed export.
        script = exports[0] + "\n" + curl.replace("curl -s", 'curl -s -w "\\n%{http_code}"', 1)
        result = subprocess.run(
            ["bash", "-c", script], capture_output=True, text=True, timeout=60, check=False
        )
        body, _, status = result.stdout.strip().rpartition("\n")
        assert status == "200", (curl, result.stdout, result.stderr)
        path = re.search(r"/v1/convai/[a-z/_-]+", curl)
        assert path is not None, curl
        answers[path.group()] = json.loads(body)
    assert process.poll() is None
    signed = answers["/v1/convai/conversation/get-signed-url"]
    token = answers["/v1/convai/conversation/token"]
    listed = answers["/v1/convai/conversations"]
    assert isinstance(signed, dict) and "conversation_signature=" in signed["signed_url"], signed
    assert isinstance(token, dict) and isinstance(token["token"], str) and token["token"], token
    # The embedded emulator is seeded: the dev user's conversations are there to be listed.
    assert isinstance(listed, dict) and isinstance(listed["conversations"], list) and listed["conversations"]


def test_dev_names_its_redis_without_the_password() -> None:
    password = "redis-pass-" + secrets.token_hex(8)
    server = RedisServer()
    server.start()
    try:
        with contextlib.closing(server.client()) as client:
            client.config_set("requirepass", password)
        url = f"redis://:{password}@127.0.0.1:{server.port}/0"
        with running_dev_command({"REDIS_URL": url}) as dev:
            banner = "\n".join(dev.lines)
    finally:
        server.close()
    assert f"Redis: redis://127.0.0.1:{server.port}/0" in banner, banner
    assert password not in banner


@pytest.mark.parametrize(
    ("request_head", "status", "code"),
    [
        (
            b"GET /healthz?q=" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: gateway\r\n\r\n",
            431,
            "request_headers_too_large",
        ),
        (b"GARBAGE\r\n\r\n", 400, "bad_request"),
    ],
    ids=["url-100KB", "garbage"],
)
def test_dev_refuses_oversized_and_malformed_requests_as_serve_does(
    request_head: bytes, status: int, code: str
) -> None:
    # `dev` ran uvicorn's own HTTP protocol: a ~100 KB URL or a malformed request line got its plain-text
    # "400 Invalid HTTP request received.", where `serve` answers with the gateway's problems.
    with running_dev_command() as dev:
        with socket.create_connection(("127.0.0.1", dev.port), timeout=10) as sock:
            sock.sendall(request_head)
            answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    assert_connection_problem(answer, code)


def test_dev_answers_only_requests_addressed_to_a_loopback_name() -> None:
    # DNS rebinding: a page from evil.example whose name then resolves to 127.0.0.1 reaches the dev servers
    # from the developer's browser with `Host: evil.example`; only the Host tells such a request apart.
    with running_dev_command() as dev:
        gateway = f"http://127.0.0.1:{dev.port}/healthz"
        emulator = f"http://127.0.0.1:{dev.emulator_port}/v1/convai/conversations"
        for url in (gateway, emulator):
            for host in (
                "evil.example",
                "evil.example:8080",
                "127.0.0.1.evil.example",
                "localhost.evil.example",
            ):
                refused = httpx.get(url, headers={"Host": host}, timeout=10)
                assert refused.status_code == 421, (url, host, refused.text)
                assert refused.headers["content-type"] == "application/problem+json"
                assert refused.json()["code"] == "misdirected_request"
                assert host not in refused.text
        for host in ("localhost", f"localhost:{dev.port}", f"127.0.0.1:{dev.port}", f"[::1]:{dev.port}",
                     f"App.LocalHost:{dev.port}"):  # fmt: skip
            assert httpx.get(gateway, headers={"Host": host}, timeout=10).status_code == 200, host
        # Without an xi-api-key the emulator refuses, but as itself (401), not as a misdirected request.
        assert httpx.get(emulator, headers={"Host": "[::1]"}, timeout=10).status_code == 401
        # The emulator's WebSocket (the signed URL's) is refused too, before the emulator sees the upgrade.
        with socket.create_connection(("127.0.0.1", dev.emulator_port), timeout=10) as sock:
            sock.sendall(
                b"GET /v1/convai/conversation HTTP/1.1\r\nHost: evil.example\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
            answer = read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 403 "), answer[:200]


def test_dev_ignores_x_forwarded_for_as_serve_does() -> None:
    # uvicorn's proxy-header handling was on in `dev` (`serve` turns it off): a local client could rewrite the
    # client IP that rate limits and the access log use, with any X-Forwarded-For.
    request_id = "xff-" + secrets.token_hex(8)
    with running_dev_command({"LOG_LEVEL": "INFO"}) as dev, output_lines(dev) as lines:
        response = httpx.get(
            f"http://127.0.0.1:{dev.port}/healthz",
            headers={"X-Forwarded-For": "203.0.113.9", "X-Request-ID": request_id},
        )
        assert response.status_code == 200
        line = next_line_with(lines, request_id)  # the request's access line
    access = json.loads(line)
    assert access["client_ip"] == "127.0.0.1", access


def test_dev_logs_and_counts_a_misdirected_request_like_every_other_refusal() -> None:
    # The 421 is answered in front of the gateway app (whose middleware logs and counts every request): it
    # wrote no access line and no count, so a DNS-rebinding attempt left no trace an operator could see.
    request_id = "rebound-" + secrets.token_hex(8)
    with running_dev_command({"LOG_LEVEL": "INFO"}) as dev, output_lines(dev) as lines:
        refused = httpx.get(
            f"http://127.0.0.1:{dev.port}/v1/convai/conversations?page_size=5",
            headers={"Host": "evil.example", "X-Request-ID": request_id},
        )
        assert refused.status_code == 421
        assert refused.headers["x-request-id"] == request_id
        # Counted before its bytes left, like the refusals of `serve`'s HTTP layer.
        metrics = httpx.get(f"http://127.0.0.1:{dev.port}/metrics").text
        line = next_line_with(lines, request_id)  # the refusal's access line
    access = json.loads(line)
    assert access["logger"] == "convai_gateway.access"
    assert (access["status"], access["route"], access["method"]) == (421, "unmatched", "GET")
    assert (access["user"], access["client_ip"], access["request_id"]) == (None, "127.0.0.1", request_id)
    assert "evil.example" not in line and "page_size" not in line
    counted = [
        sample.value
        for family in text_string_to_metric_families(metrics)
        if family.name == "convai_gateway_http_requests"
        for sample in family.samples
        if sample.name.endswith("_total")
        and sample.labels == {"method": "GET", "route": "unmatched", "status": "421"}
    ]
    assert counted == [1.0]

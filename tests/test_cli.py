"""The command line: exit codes, check-config, token, and `dev` whose printed curl lines work when pasted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator

import jwt
import pytest

from tests.support.dev_command import running_dev_command

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


def test_check_config_lists_every_problem_and_exits_2() -> None:
    result = run_cli("check-config", env={"OWNERSHIP_MODE": "everyone", "JWT_HS256_SECRET": "short"})
    assert result.returncode == 2
    for name in ("ELEVENLABS_API_KEY", "OWNERSHIP_MODE", "JWT_HS256_SECRET", "ALLOWED_AGENT_IDS"):
        assert name in result.stderr
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


def test_token_refuses_a_missing_or_short_secret() -> None:
    result = run_cli("token", "--sub", "bob", env={"JWT_HS256_SECRET": "short"})
    assert result.returncode == 2
    assert "JWT_HS256_SECRET" in result.stderr


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
    for curl in curls:
        # Paste exactly what was printed into a shell, with the printed export.
        script = exports[0] + "\n" + curl.replace("curl -s", 'curl -s -w "\\n%{http_code}"', 1)
        result = subprocess.run(
            ["bash", "-c", script], capture_output=True, text=True, timeout=60, check=False
        )
        status = result.stdout.strip().splitlines()[-1]
        assert status == "200", (curl, result.stdout, result.stderr)
    assert process.poll() is None
    assert re.search(r"signed_url|conversations|token", " ".join(lines)) is not None

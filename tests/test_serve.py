"""`convai-gateway serve`: several workers share metrics, and SIGTERM lets in-flight requests finish."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.dev_tokens import mint_token
from tests.conftest import EMULATOR_API_KEY
from tests.support.gateway import TEST_JWT_SECRET, gateway_env
from tests.support.servers import free_port


def wait_until_ready(base: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
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
def served(
    emulator_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("ELEVENLABS_", "JWT_", "REDIS_", "PROMETHEUS_"))
        },
        **gateway_env(emulator_url, EMULATOR_API_KEY, redis_url, LOG_LEVEL="WARNING"),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path_factory.mktemp("metrics")),
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service",
            "serve",
            "--port",
            str(port),
            "--workers",
            "2",
            "--graceful-timeout",
            "15",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, process)
        yield base, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=20)


def test_workers_share_one_set_of_metrics(served: tuple[str, subprocess.Popen[bytes]]) -> None:
    base, _ = served
    with httpx.Client(base_url=base) as client:
        for _ in range(40):
            # A fresh connection each time, so the kernel spreads requests over both workers.
            assert httpx.get(f"{base}/healthz").status_code == 200
        text = client.get("/metrics").text
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "convai_gateway_http_requests":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels.get("route") == "/healthz":
                    total += sample.value
    assert total == 40


def test_sigterm_lets_in_flight_requests_finish(
    served: tuple[str, subprocess.Popen[bytes]], emulator_url: str
) -> None:
    base, process = served
    httpx.post(
        f"{emulator_url}/_emulator/faults",
        json={"endpoint": "list", "kind": "slow", "delay_seconds": 1.5, "times": 1},
    ).raise_for_status()
    httpx.delete(f"{emulator_url}/_emulator/requests").raise_for_status()
    token = mint_token(TEST_JWT_SECRET, "alice")
    result: dict[str, object] = {}

    def slow_request() -> None:
        try:
            response = httpx.get(
                f"{base}/v1/convai/conversations", headers={"Authorization": f"Bearer {token}"}, timeout=20
            )
            result["status"] = response.status_code
        except httpx.HTTPError as exc:
            result["error"] = repr(exc)

    thread = threading.Thread(target=slow_request)
    thread.start()
    deadline = time.monotonic() + 10
    # Condition wait: the request is in flight once the upstream has received it.
    while not httpx.get(f"{emulator_url}/_emulator/requests").json():
        assert time.monotonic() < deadline, "request never reached upstream"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    thread.join(timeout=20)
    assert result == {"status": 200}
    assert process.wait(timeout=20) == 0

"""Fault injection over real HTTP: each kind, queued or per request, consumed one per matching request."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.emulator.conftest import AUTH
from tests.support.servers import ServedApp

LIST = "/v1/convai/conversations"


@pytest.fixture
def http(served: ServedApp) -> Iterator[httpx.Client]:
    """Yield a client for the served emulator with one conversation in it."""
    with httpx.Client(base_url=served.url, timeout=5) as client:
        client.post(
            "/_emulator/conversations", json={"conversation_id": "conv_x", "audio_size_bytes": 200_000}
        )
        yield client


def queue(http: httpx.Client, **fault: object) -> None:
    """Queue a fault through the control API."""
    assert http.post("/_emulator/faults", json=fault).status_code == 200


def test_status_fault_answers_that_status_for_the_queued_number_of_requests(http: httpx.Client) -> None:
    queue(http, endpoint="list", kind="status", status=503, times=2)
    assert http.get("/v1/convai/conversations/conv_x", headers=AUTH).status_code == 200
    first, second, third = (http.get(LIST, headers=AUTH) for _ in range(3))
    assert (first.status_code, second.status_code, third.status_code) == (503, 503, 200)
    assert first.json()["detail"]["status"] == "emulated_fault"


def test_rate_limit_fault_is_429_with_retry_after(http: httpx.Client) -> None:
    queue(http, endpoint="token", kind="rate_limit", retry_after=7)
    response = http.get("/v1/convai/conversation/token", params={"agent_id": "a"}, headers=AUTH)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert (
        http.get("/v1/convai/conversation/token", params={"agent_id": "a"}, headers=AUTH).status_code == 200
    )


def test_slow_fault_delays_then_answers_normally(http: httpx.Client) -> None:
    queue(http, endpoint="get", kind="slow", delay_seconds=0.4)
    started = time.monotonic()
    response = http.get("/v1/convai/conversations/conv_x", headers=AUTH)
    assert time.monotonic() - started >= 0.4
    assert response.status_code == 200 and response.json()["conversation_id"] == "conv_x"
    with pytest.raises(httpx.ReadTimeout):
        queue(http, endpoint="get", kind="slow", delay_seconds=0.6)
        http.get("/v1/convai/conversations/conv_x", headers=AUTH, timeout=0.2)


def test_malformed_json_fault_is_200_json_that_does_not_parse(http: httpx.Client) -> None:
    queue(http, endpoint="list", kind="malformed_json")
    response = http.get(LIST, headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    with pytest.raises(json.JSONDecodeError):
        response.json()


@pytest.mark.parametrize(
    ("endpoint", "method", "path"),
    [
        ("get", "GET", "/v1/convai/conversations/conv_x"),
        ("audio", "GET", "/v1/convai/conversations/conv_x/audio"),
    ],
)
def test_drop_fault_breaks_the_connection(http: httpx.Client, endpoint: str, method: str, path: str) -> None:
    queue(http, endpoint=endpoint, kind="drop")
    with pytest.raises(httpx.TransportError):
        http.request(method, path, headers=AUTH)
    assert http.request(method, path, headers=AUTH).status_code == 200


def test_wildcard_fault_matches_any_endpoint_and_queue_order_is_kept(http: httpx.Client) -> None:
    queue(http, endpoint="*", kind="status", status=500)
    queue(http, endpoint="*", kind="status", status=502)
    assert http.post("/v1/convai/conversations/conv_x/feedback", json={}, headers=AUTH).status_code == 500
    assert http.delete("/v1/convai/conversations/conv_y", headers=AUTH).status_code == 502
    assert http.delete("/v1/convai/conversations/conv_y", headers=AUTH).status_code == 404


def test_unauthenticated_requests_do_not_consume_faults(http: httpx.Client) -> None:
    queue(http, endpoint="list", kind="status", status=503)
    assert http.get(LIST).status_code == 401
    assert http.get(LIST, headers=AUTH).status_code == 503


@pytest.mark.parametrize(
    ("header", "status"),
    [
        ("kind=status;status=502", 502),
        ("kind=rate_limit; retry_after=3", 429),
        ("kind=slow;delay_seconds=0", 200),
    ],
)
def test_fault_header_selects_a_fault_for_one_request(http: httpx.Client, header: str, status: int) -> None:
    queue(http, endpoint="list", kind="status", status=503)
    response = http.get(LIST, headers={**AUTH, "X-Emulator-Fault": header})
    assert response.status_code == status
    if status == 429:
        assert response.headers["retry-after"] == "3"
    assert http.get(LIST, headers=AUTH).status_code == 503


def test_fault_header_drop_and_malformed_json(http: httpx.Client) -> None:
    with pytest.raises(httpx.TransportError):
        http.get(LIST, headers={**AUTH, "X-Emulator-Fault": "kind=drop"})
    response = http.get(LIST, headers={**AUTH, "X-Emulator-Fault": "kind=malformed_json"})
    with pytest.raises(json.JSONDecodeError):
        response.json()


def test_invalid_fault_header_is_a_400(http: httpx.Client) -> None:
    response = http.get(LIST, headers={**AUTH, "X-Emulator-Fault": "kind=meltdown"})
    assert response.status_code == 400
    assert http.get(LIST, headers={**AUTH, "X-Emulator-Fault": "garbage"}).status_code == 400

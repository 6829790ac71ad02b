"""Prometheus metrics: request counters and histograms by route template, text rendering, multiprocess mode."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import values
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from service.observability import (
    METRICS_MAX_CONNECTIONS,
    MULTIPROC_ENV,
    Metrics,
    mark_process_dead,
    reap_dead_workers,
    serve_metrics_port,
)
from tests.observability.support import FakeClock, build_app

ROOT = Path(__file__).resolve().parents[2]


def samples(body: bytes) -> list[Sample]:
    """Parse a Prometheus text exposition into its samples."""
    return [s for family in text_string_to_metric_families(body.decode()) for s in family.samples]


def value(body: bytes, name: str, **labels: str) -> float | None:
    """Return the one sample called `name` with exactly these labels, or None."""
    found = [s.value for s in samples(body) if s.name == name and s.labels == labels]
    assert len(found) <= 1
    return found[0] if found else None


def client(app: object, base_url: str = "http://testserver") -> httpx.AsyncClient:
    """Return an in-process client for `app`."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url=base_url)


async def test_requests_are_counted_by_route_template_not_raw_path() -> None:
    metrics = Metrics()
    async with client(build_app(metrics)) as http:
        for item in ("42", "43", "secret-id-44"):
            assert (await http.get(f"/items/{item}")).status_code == 200
        assert (await http.get("/no/such/path/123")).status_code == 404
        assert (await http.post("/items/7")).status_code == 405

    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    total = "convai_gateway_http_requests_total"
    assert value(body, total, method="GET", route="/items/{item_id}", status="200") == 3
    assert value(body, total, method="GET", route="unmatched", status="404") == 1
    assert value(body, total, method="POST", route="/items/{item_id}", status="405") == 1
    routes = {s.labels.get("route") for s in samples(body) if "route" in s.labels}
    assert routes == {"/items/{item_id}", "unmatched"}
    assert b"secret-id-44" not in body and b"/no/such/path" not in body


async def test_latency_histogram_records_handler_time() -> None:
    metrics, clock = Metrics(), FakeClock()
    async with client(build_app(metrics, clock=clock)) as http:
        await http.get("/items/1")
        await http.get("/items/2")
    body, _ = metrics.render()
    name = "convai_gateway_http_request_duration_seconds"
    assert value(body, name + "_count", method="GET", route="/items/{item_id}") == 2
    assert value(body, name + "_sum", method="GET", route="/items/{item_id}") == pytest.approx(0.6)
    assert value(body, name + "_bucket", method="GET", route="/items/{item_id}", le="0.25") == 0
    assert value(body, name + "_bucket", method="GET", route="/items/{item_id}", le="0.5") == 2


async def test_streaming_duration_runs_until_the_body_ends_and_excludes_background_work() -> None:
    metrics, clock = Metrics(), FakeClock()
    async with client(build_app(metrics, clock=clock)) as http:
        response = await http.get("/stream")
    assert response.content == b"firstsecond"
    body, _ = metrics.render()
    name = "convai_gateway_http_request_duration_seconds_sum"
    assert value(body, name, method="GET", route="/stream") == pytest.approx(2.0)


async def test_unknown_methods_share_one_label() -> None:
    metrics = Metrics()
    async with client(build_app(metrics)) as http:
        await http.request("BREW", "/items/1")
        await http.request("XYZZY", "/items/1")
    body, _ = metrics.render()
    assert (
        value(
            body, "convai_gateway_http_requests_total", method="OTHER", route="/items/{item_id}", status="405"
        )
        == 2
    )
    assert b"BREW" not in body and b"XYZZY" not in body


async def test_unhandled_error_is_counted_as_500() -> None:
    metrics = Metrics()
    async with client(build_app(metrics)) as http:
        assert (await http.get("/boom")).status_code == 500
    body, _ = metrics.render()
    assert value(body, "convai_gateway_http_requests_total", method="GET", route="/boom", status="500") == 1


def test_refused_requests_are_counted_under_unmatched_without_a_duration() -> None:
    metrics = Metrics()
    metrics.count_refused_request("GET", 431)
    metrics.count_refused_request("BREW", 408)
    body, _ = metrics.render()
    counted = "convai_gateway_http_requests_total"
    assert value(body, counted, method="GET", route="unmatched", status="431") == 1
    assert value(body, counted, method="OTHER", route="unmatched", status="408") == 1
    assert b"BREW" not in body
    # A 408 lasts as long as the header deadline: timed, a slowloris burst would read as a slow gateway.
    assert not [s for s in samples(body) if s.name.startswith("convai_gateway_http_request_duration_seconds")]


def test_domain_metrics_render_and_parse() -> None:
    metrics = Metrics()
    metrics.observe_upstream("get_signed_url", "ok", 0.12)
    metrics.observe_upstream("get_signed_url", "timeout", 10.0)
    metrics.observe_rate_limit("user-session", "allowed")
    metrics.observe_rate_limit("user-session", "limited")
    metrics.observe_rate_limit("user-session", "limited")
    metrics.redis_error()
    metrics.circuit_state("open")
    metrics.jwks_refresh("ok")
    metrics.jwks_refresh("error")
    metrics.ledger_write("error")

    body, _ = metrics.render()
    assert value(body, "convai_gateway_upstream_requests_total", endpoint="get_signed_url", outcome="ok") == 1
    assert (
        value(body, "convai_gateway_upstream_requests_total", endpoint="get_signed_url", outcome="timeout")
        == 1
    )
    assert value(body, "convai_gateway_upstream_request_duration_seconds_sum", endpoint="get_signed_url") == (
        pytest.approx(10.12)
    )
    assert (
        value(body, "convai_gateway_rate_limit_decisions_total", policy="user-session", outcome="limited")
        == 2
    )
    assert value(body, "convai_gateway_redis_errors_total") == 1
    assert value(body, "convai_gateway_redis_circuit_state", state="open") == 1
    assert value(body, "convai_gateway_redis_circuit_state", state="closed") == 0
    assert value(body, "convai_gateway_redis_circuit_state", state="half_open") == 0
    assert value(body, "convai_gateway_jwks_refreshes_total", outcome="error") == 1
    assert value(body, "convai_gateway_ledger_writes_total", outcome="error") == 1

    metrics.circuit_state("half_open")
    body, _ = metrics.render()
    assert value(body, "convai_gateway_redis_circuit_state", state="open") == 0
    assert value(body, "convai_gateway_redis_circuit_state", state="half_open") == 1
    with pytest.raises(ValueError, match="unknown circuit state"):
        metrics.circuit_state("ajar")


def test_each_instance_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.redis_error()
    assert value(first.render()[0], "convai_gateway_redis_errors_total") == 1
    assert value(second.render()[0], "convai_gateway_redis_errors_total") == 0


async def test_metrics_endpoint_serves_text_format() -> None:
    metrics = Metrics()
    async with client(build_app(metrics)) as http:
        await http.get("/items/1")
        response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert response.headers["cache-control"] == "no-store"
    assert (
        value(
            response.content,
            "convai_gateway_http_requests_total",
            method="GET",
            route="/items/{item_id}",
            status="200",
        )
        == 1
    )


@pytest.fixture
def multiproc_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point PROMETHEUS_MULTIPROC_DIR at a temp dir; afterwards put prometheus-client back in memory mode."""
    original = values.ValueClass
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    yield tmp_path
    monkeypatch.delenv(MULTIPROC_ENV)
    if values.ValueClass is not original:
        values.ValueClass.close_all_files()
        values.ValueClass = original


WORKER = """
import json, os, sys
from service.observability import Metrics
metrics = Metrics()
metrics.observe_request("GET", "/v1/convai/conversations", 200, 0.05)
metrics.observe_rate_limit("user-history", "allowed")
metrics.circuit_state(sys.argv[1])
print(json.dumps({"pid": os.getpid()}))
"""


def run_workers(directory: Path, *states: str) -> list[int]:
    """Run one short-lived worker process per circuit state, writing metrics into `directory`; return pids."""
    with live_workers(directory, *states) as workers:
        pids = [worker.pid for worker in workers]
    return pids  # every one of them has exited


@contextlib.contextmanager
def live_workers(directory: Path, *states: str) -> Iterator[list[subprocess.Popen[str]]]:
    """Run one worker process per circuit state that stays alive (until its stdin closes) for the block."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        MULTIPROC_ENV: str(directory),
        "PYTHONPATH": str(ROOT),
    }
    workers: list[subprocess.Popen[str]] = []
    try:
        for state in states:
            worker = subprocess.Popen(
                [sys.executable, "-c", WORKER + "sys.stdout.flush()\nsys.stdin.read()\n", state],
                env=env,
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            workers.append(worker)
            assert worker.stdout is not None
            # The pid line comes after the metrics are written: the worker is ready once it is read.
            assert json.loads(worker.stdout.readline())["pid"] == worker.pid
        yield workers
    finally:
        for worker in workers:
            stop_worker(worker)


def stop_worker(worker: subprocess.Popen[str]) -> None:
    """Let a live worker exit and reap it."""
    if worker.stdin is not None and not worker.stdin.closed:
        worker.stdin.close()
    worker.wait(timeout=30)
    if worker.stdout is not None:
        worker.stdout.close()


async def test_multiprocess_mode_aggregates_workers(multiproc_dir: Path) -> None:
    with live_workers(multiproc_dir, "open", "closed") as (open_worker, _):
        assert list(multiproc_dir.glob("*.db")), "workers wrote no metric files"
        metrics = Metrics()
        async with client(build_app(metrics)) as http:
            response = await http.get("/metrics")
        body = response.content
        route = "/v1/convai/conversations"
        assert value(body, "convai_gateway_http_requests_total", method="GET", route=route, status="200") == 2
        assert (
            value(body, "convai_gateway_http_request_duration_seconds_count", method="GET", route=route) == 2
        )
        assert (
            value(body, "convai_gateway_rate_limit_decisions_total", policy="user-history", outcome="allowed")
            == 2
        )
        # livemax: one worker's open breaker shows, whatever the others say.
        assert value(body, "convai_gateway_redis_circuit_state", state="open") == 1
        assert value(body, "convai_gateway_redis_circuit_state", state="closed") == 1

        mark_process_dead(open_worker.pid)
        body, _ = metrics.render()
        assert value(body, "convai_gateway_redis_circuit_state", state="open") == 0
        assert value(body, "convai_gateway_redis_circuit_state", state="closed") == 1
        # Counters of a dead worker still count.
        assert value(body, "convai_gateway_http_requests_total", method="GET", route=route, status="200") == 2


async def test_a_worker_that_died_without_a_hook_stops_showing_its_circuit_state(multiproc_dir: Path) -> None:
    # uvicorn's supervisor replaces a crashed worker and tells nobody: the next scrape must notice by itself.
    with live_workers(multiproc_dir, "open", "closed") as (open_worker, closed_worker):
        metrics = Metrics()
        assert value(metrics.render()[0], "convai_gateway_redis_circuit_state", state="open") == 1
        stop_worker(open_worker)
        body, _ = metrics.render()
        assert value(body, "convai_gateway_redis_circuit_state", state="open") == 0
        assert value(body, "convai_gateway_redis_circuit_state", state="closed") == 1
        assert not list(multiproc_dir.glob(f"gauge_livemax_{open_worker.pid}.db"))
        assert list(multiproc_dir.glob(f"gauge_livemax_{closed_worker.pid}.db"))
        route = "/v1/convai/conversations"
        assert value(body, "convai_gateway_http_requests_total", method="GET", route=route, status="200") == 2


def test_reap_dead_workers_names_only_the_gone_ones(multiproc_dir: Path) -> None:
    gone = run_workers(multiproc_dir, "open", "half_open")
    with live_workers(multiproc_dir, "closed") as (alive,):
        assert reap_dead_workers(str(multiproc_dir)) == sorted(gone)
        assert reap_dead_workers(str(multiproc_dir)) == []
        assert list(multiproc_dir.glob(f"gauge_livemax_{alive.pid}.db"))


def test_a_scrape_that_loses_the_race_to_reap_a_dead_worker_still_answers(
    multiproc_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two scrapes at once (an HA pair of Prometheus servers, or two workers' /metrics) both find a dead
    # worker's live-gauge file; whichever removes it second must still answer, not fail with a 500.
    (gone,) = run_workers(multiproc_dir, "open")
    remove = os.remove

    def remove_after_the_other_scrape(file: str | os.PathLike[str]) -> None:
        remove(file)  # the concurrent scrape got there first
        remove(file)

    monkeypatch.setattr(os, "remove", remove_after_the_other_scrape)
    assert reap_dead_workers(str(multiproc_dir)) == [gone]
    assert not list(multiproc_dir.glob(f"gauge_livemax_{gone}.db"))
    run_workers(multiproc_dir, "open")
    body, _ = Metrics().render()
    assert value(body, "convai_gateway_redis_circuit_state", state="open") is None
    route = "/v1/convai/conversations"
    assert value(body, "convai_gateway_http_requests_total", method="GET", route=route, status="200") == 2
    (later,) = run_workers(multiproc_dir, "open")
    mark_process_dead(later)  # a process manager's hook racing a scrape over the same file
    assert not list(multiproc_dir.glob(f"gauge_livemax_{later}.db"))


def test_multiprocess_mode_applies_even_when_the_env_is_set_after_import(multiproc_dir: Path) -> None:
    # The CLI sets PROMETHEUS_MULTIPROC_DIR after prometheus-client was imported, then serves in-process.
    metrics = Metrics()
    metrics.observe_request("GET", "/healthz", 200, 0.001)
    assert list(multiproc_dir.glob(f"counter_{os.getpid()}.db"))
    run_workers(multiproc_dir, "closed")
    body, _ = metrics.render()
    assert (
        value(body, "convai_gateway_http_requests_total", method="GET", route="/healthz", status="200") == 1
    )
    assert (
        value(
            body,
            "convai_gateway_http_requests_total",
            method="GET",
            route="/v1/convai/conversations",
            status="200",
        )
        == 1
    )


def test_separate_metrics_port_serves_all_workers(multiproc_dir: Path) -> None:
    run_workers(multiproc_dir, "open")  # exited: its counters count, its circuit state is gone
    with live_workers(multiproc_dir, "closed"):
        server = serve_metrics_port("127.0.0.1", 0)
        try:
            response = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10)
        finally:
            server.close()
    assert response.status_code == 200
    route = "/v1/convai/conversations"
    assert (
        value(response.content, "convai_gateway_http_requests_total", method="GET", route=route, status="200")
        == 2
    )
    assert value(response.content, "convai_gateway_redis_circuit_state", state="open") == 0
    assert value(response.content, "convai_gateway_redis_circuit_state", state="closed") == 1


def test_the_metrics_port_drops_a_connection_that_sends_nothing(multiproc_dir: Path) -> None:
    # Each connection to the metrics port holds a thread, in the serving process when there is one worker:
    # one that never sends a request must not hold it for ever.
    server = serve_metrics_port("127.0.0.1", 0, idle_timeout=0.2)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as idle:
            assert idle.recv(1) == b"", "the listener kept an idle connection open"
        assert httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10).status_code == 200
    finally:
        server.close()


def test_the_metrics_port_holds_a_bounded_number_of_connections(multiproc_dir: Path) -> None:
    server = serve_metrics_port("127.0.0.1", 0, idle_timeout=60)
    idle: list[socket.socket] = []
    try:
        for _ in range(METRICS_MAX_CONNECTIONS):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=30))
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as extra:
            with contextlib.suppress(ConnectionResetError):
                assert extra.recv(1) == b"", "a connection over the limit got a thread of its own"
    finally:
        for connection in idle:
            connection.close()
        server.close()


def test_separate_metrics_port_requires_multiprocess_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    with pytest.raises(RuntimeError, match=MULTIPROC_ENV):
        serve_metrics_port("127.0.0.1", 0)

"""Compare upstream transports side by side: httpx's own vs httpx-aiohttp (vs raw aiohttp as a ceiling).

Not a test: run it by hand (or from `make bench`) to choose `service.upstream.DEFAULT_TRANSPORT`.

    .venv/bin/python -m tests.perf.transport_compare [--duration 10] [--concurrency 10 50]

It starts, each in its own process on loopback under uvicorn: the upstream emulator, and one minimal
Starlette proxy per transport whose only route calls `UpstreamClient.get_signed_url` (the gateway's hot
path minus auth and rate limiting). Load comes from `wrk` (`apt-get install -y wrk`) or, without it, a
bounded asyncio load generator; each proxy gets a short warm-up, then `--duration` seconds per
concurrency level, variants interleaved (`--rounds N` repeats and keeps the median run). It prints
req/s, p50 and p99 per transport and the ratio against httpx's transport.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn

from tests.perf.load import parse_wrk

API_KEY = "xi-bench-key-0123456789abcdef0123456789"
ROUTE = "/v1/convai/conversation/get-signed-url?agent_id=agent_demo"
VARIANTS = ("httpx", "aiohttp", "aiohttp-raw")


# --- the processes under test -------------------------------------------------------------------------


def build_proxy(variant: str, upstream_url: str) -> Any:
    """Build the minimal proxy app for one transport variant."""
    import aiohttp
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from service.settings import Secret, Settings
    from service.upstream import TransportKind, UpstreamClient, create_http_client, create_transport

    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if variant == "aiohttp-raw":
            # A ceiling for reference: aiohttp with no httpx layer at all.
            session = aiohttp.ClientSession(
                base_url=upstream_url,
                headers={"xi-api-key": API_KEY},
                connector=aiohttp.TCPConnector(limit=200),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
            state["session"] = session
            try:
                yield
            finally:
                await session.close()
            return
        settings = Settings(elevenlabs_api_key=Secret(API_KEY), elevenlabs_base_url=upstream_url)
        kind: TransportKind = "aiohttp" if variant == "aiohttp" else "httpx"
        http = create_http_client(settings, transport=create_transport(kind))
        state["client"] = UpstreamClient(http)
        try:
            yield
        finally:
            await http.aclose()

    async def signed_url(request: Request) -> Response:
        agent_id = request.query_params["agent_id"]
        if variant == "aiohttp-raw":
            params = {"agent_id": agent_id, "include_conversation_id": "true"}
            async with state["session"].get("/v1/convai/conversation/get-signed-url", params=params) as resp:
                body = await resp.json()
        else:
            body = await state["client"].get_signed_url(agent_id)
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    return Starlette(routes=[Route("/v1/convai/conversation/get-signed-url", signed_url)], lifespan=lifespan)


def run_server(role: str, port: int, variant: str, upstream_url: str) -> None:
    """Serve the emulator or one proxy variant in this process until terminated."""
    if role == "emulator":
        from service.emulator import create_emulator_app
        from service.emulator.store import SESSION_TTL_SECONDS

        # The emulator keeps every minted signed-URL session until it expires and scans them all on each
        # mint, so under load it slows down as the run goes on and the first variant measured would win.
        # A clock that jumps past the session lifetime on every reading expires each session by the next
        # mint, keeping the upstream's cost per request constant across variants and runs.
        ticks = itertools.count(time.time(), SESSION_TTL_SECONDS + 1)
        app = create_emulator_app(API_KEY, seed=False, clock=lambda: float(next(ticks)))
    else:
        app = build_proxy(variant, upstream_url)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        ws="none",
        log_level="warning",
        access_log=False,
    )


@contextlib.contextmanager
def server_process(role: str, port: int, *, variant: str = "", upstream_url: str = "") -> Iterator[str]:
    """Start a server subprocess, wait until it answers, yield its URL and stop it."""
    args = [sys.executable, "-m", "tests.perf.transport_compare", "--serve", role, "--port", str(port)]
    if variant:
        args += ["--variant", variant, "--upstream", upstream_url]
    process = subprocess.Popen(args)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(url + "/", timeout=0.5)
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{role} {variant} did not start") from None
                time.sleep(0.05)  # polling a child process's start-up
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- load ---------------------------------------------------------------------------------------------


@dataclass
class Result:
    """One load run's throughput and latency percentiles."""

    requests_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int


def load_with_wrk(url: str, concurrency: int, duration: float) -> Result:
    """Drive `url` with wrk (one thread) and parse its summary."""
    wrk = shutil.which("wrk")
    assert wrk is not None
    output = subprocess.run(
        [wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--latency", url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    measured = parse_wrk(output)
    return Result(measured.requests_per_second, measured.p50_ms, measured.p99_ms, measured.errors)


async def _load_with_asyncio(url: str, concurrency: int, duration: float) -> Result:
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:
        deadline = time.perf_counter() + duration

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    response = await client.get(url)
                    if response.status_code != 200:
                        errors += 1
                except httpx.HTTPError:
                    errors += 1
                latencies.append((time.perf_counter() - started) * 1000)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    cuts = statistics.quantiles(latencies, n=100)
    return Result(len(latencies) / elapsed, cuts[49], cuts[98], errors)


def load(url: str, concurrency: int, duration: float) -> Result:
    """Drive `url` with wrk if installed, else with the bounded asyncio generator."""
    if shutil.which("wrk"):
        return load_with_wrk(url, concurrency, duration)
    return asyncio.run(_load_with_asyncio(url, concurrency, duration))


# --- driver -------------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def compare(
    variants: list[str], concurrencies: list[int], duration: float, warmup: float, rounds: int
) -> None:
    """Run every variant at every concurrency level against one emulator and print the table."""
    generator = "wrk -t1" if shutil.which("wrk") else "asyncio httpx generator"
    print(
        f"# cpus={os.cpu_count()} load={generator} duration={duration:g}s warmup={warmup:g}s rounds={rounds}",
        flush=True,
    )
    runs: dict[tuple[str, int], list[Result]] = {}
    with contextlib.ExitStack() as stack:
        upstream_url = stack.enter_context(server_process("emulator", _free_port()))
        # All proxies run at once (idle unless loaded) and the variants are measured interleaved, so
        # background noise on the machine spreads over them instead of favouring one.
        proxies = {
            variant: stack.enter_context(
                server_process("proxy", _free_port(), variant=variant, upstream_url=upstream_url)
            )
            for variant in variants
        }
        for proxy in proxies.values():
            load(proxy + ROUTE, max(concurrencies), warmup)
        for round_number in range(1, rounds + 1):
            for concurrency in concurrencies:
                for variant, proxy in proxies.items():
                    result = load(proxy + ROUTE, concurrency, duration)
                    runs.setdefault((variant, concurrency), []).append(result)
                    print(
                        f"  round {round_number} {variant:<12} c={concurrency:<3}"
                        f" {result.requests_per_second:8.0f} req/s",
                        flush=True,
                    )
    results = {key: _median(values) for key, values in runs.items()}
    print()
    print(f"{'transport':<14}{'conc':>5}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'vs httpx':>10}")
    for concurrency in concurrencies:
        baseline = results.get(("httpx", concurrency))
        for variant in variants:
            r = results[variant, concurrency]
            ratio = f"{r.requests_per_second / baseline.requests_per_second:.2f}x" if baseline else "-"
            print(
                f"{variant:<14}{concurrency:>5}{r.requests_per_second:>10.0f}{r.p50_ms:>9.2f}"
                f"{r.p99_ms:>9.2f}{r.errors:>8}{ratio:>10}"
            )


def _median(results: list[Result]) -> Result:
    """Return the run with the median throughput (its latencies come with it)."""
    ordered = sorted(results, key=lambda r: r.requests_per_second)
    return ordered[len(ordered) // 2]


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and run the comparison (or, internally, serve one process)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per variant")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--rounds", type=int, default=1, help="repeat and report the median run")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--serve", choices=("emulator", "proxy"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="", help=argparse.SUPPRESS)
    parser.add_argument("--upstream", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        run_server(args.serve, args.port, args.variant, args.upstream)
        return
    compare(args.variants, args.concurrency, args.duration, args.warmup, args.rounds)


if __name__ == "__main__":
    main()

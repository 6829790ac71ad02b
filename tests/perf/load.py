"""Load for the benchmark: wrk with a generated Lua script, or a bounded aiohttp generator without wrk.

`Workload` names one request (method, path, headers, body). `measure` drives a URL at a concurrency for a
duration and returns req/s, p50 and p99; `soak` sends an exact number of requests (rotating over several
workloads) and returns when they are done.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Workload:
    """One request a load generator repeats."""

    name: str
    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: str = ""


@dataclass(frozen=True)
class Measurement:
    """One load run's throughput, latency percentiles and failures."""

    requests_per_second: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    cpu_us_per_request: float | None = None  # the target's CPU time per request, when measured

    def as_json(self) -> dict[str, Any]:
        """Return the measurement as a JSON-ready dict."""
        return asdict(self)


def generator_name() -> str:
    """Name the load generator in use: wrk when installed, else the aiohttp fallback."""
    return "wrk -t1" if shutil.which("wrk") else "aiohttp (wrk not installed)"


# --- wrk -------------------------------------------------------------------------------------------------


def _lua_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _lua_table(headers: Mapping[str, str]) -> str:
    return "{" + ", ".join(f"[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items()) + "}"


def lua_script(
    workloads: Sequence[Workload], stop_after: int | None = None, marker: Path | None = None
) -> str:
    """Return a wrk script cycling over `workloads`; with `stop_after`, it stops and writes `marker` then."""
    formats = ", ".join(
        f"wrk.format({_lua_string(w.method)}, {_lua_string(w.path)}, {_lua_table(w.headers)}, "
        f"{_lua_string(w.body) if w.body else 'nil'})"
        for w in workloads
    )
    script = f"""
local requests = nil
local index = 0
function request()
  if requests == nil then requests = {{{formats}}} end
  index = index % #requests + 1
  return requests[index]
end
"""
    if stop_after is not None and marker is not None:
        # wrk runs for its whole -d even after thread:stop(); the marker tells the driver to end it early.
        script += f"""
local done = 0
function response(status, headers, body)
  done = done + 1
  if done == {stop_after} then
    wrk.thread:stop()
    local marker = io.open({_lua_string(str(marker))}, "w")
    marker:write("done")
    marker:close()
  end
end
"""
    return script


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _latency(output: str, percentile: str) -> float:
    match = re.search(rf"^\s*{percentile}%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no {percentile}% latency in wrk output:\n{output}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> Measurement:
    """Parse wrk's `--latency` summary."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    if rps is None or total is None:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    errors = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if sockets:
        errors += sum(int(n) for n in sockets.groups())
    return Measurement(
        float(rps.group(1)), _latency(output, "50"), _latency(output, "99"), int(total.group(1)), errors
    )


def _run_wrk(
    base_url: str,
    workloads: Sequence[Workload],
    concurrency: int,
    seconds: int,
    script_dir: Path,
    stop_after: int | None,
) -> Measurement:
    wrk = shutil.which("wrk")
    assert wrk is not None
    stem = script_dir / f"load-{time.monotonic_ns()}"
    script, marker = stem.with_suffix(".lua"), stem.with_suffix(".done")
    script.write_text(lua_script(workloads, stop_after, marker))
    args = [
        wrk,
        "-t1",
        f"-c{concurrency}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(script),
        base_url,
    ]
    try:
        with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
            began = time.perf_counter()
            elapsed: float | None = None
            try:
                if stop_after is not None:
                    while process.poll() is None:
                        if marker.exists():
                            elapsed = time.perf_counter() - began
                            process.send_signal(signal.SIGINT)  # wrk prints its summary and exits
                            break
                        time.sleep(0.05)  # polling for the marker the Lua script writes
                stdout, stderr = process.communicate(timeout=seconds + 30)
            except BaseException:
                process.kill()
                raise
    finally:
        script.unlink(missing_ok=True)
        marker.unlink(missing_ok=True)
    if process.returncode != 0:
        raise RuntimeError(f"wrk failed ({process.returncode}): {stderr}")
    measured = parse_wrk(stdout)
    if elapsed is not None:
        # wrk divides by its own run time, which includes the moment it took to stop after the marker.
        measured = replace(measured, requests_per_second=measured.requests / elapsed)
    return measured


# --- aiohttp fallback -----------------------------------------------------------------------------------


async def _drive(
    base_url: str, workloads: Sequence[Workload], concurrency: int, seconds: float, stop_after: int | None
) -> Measurement:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session:

        async def worker() -> None:
            nonlocal errors, sent
            while time.perf_counter() < deadline and (stop_after is None or sent < stop_after):
                workload = workloads[sent % len(workloads)]
                sent += 1
                started = time.perf_counter()
                try:
                    async with session.request(
                        workload.method,
                        base_url + workload.path,
                        headers=dict(workload.headers),
                        data=workload.body.encode() if workload.body else None,
                    ) as response:
                        await response.read()
                        if not 200 <= response.status < 400:
                            errors += 1
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1
                latencies.append((time.perf_counter() - started) * 1000)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    if len(latencies) < 2:
        raise RuntimeError(f"the load generator completed only {len(latencies)} request(s)")
    cuts = statistics.quantiles(latencies, n=100)
    return Measurement(len(latencies) / elapsed, cuts[49], cuts[98], len(latencies), errors)


# --- entry points ---------------------------------------------------------------------------------------


def measure(
    base_url: str, workload: Workload, concurrency: int, seconds: float, script_dir: Path
) -> Measurement:
    """Drive one workload at `concurrency` for `seconds` (whole seconds with wrk, at least 1)."""
    if shutil.which("wrk"):
        return _run_wrk(base_url, [workload], concurrency, max(1, round(seconds)), script_dir, None)
    return asyncio.run(_drive(base_url, [workload], concurrency, seconds, None))


def soak(
    base_url: str,
    workloads: Sequence[Workload],
    requests: int,
    concurrency: int,
    script_dir: Path,
    *,
    time_limit: float = 900.0,
) -> Measurement:
    """Send `requests` requests rotating over `workloads` (stopping early only at `time_limit` seconds)."""
    if shutil.which("wrk"):
        # One wrk thread: its response counter is the whole run's.
        return _run_wrk(base_url, workloads, concurrency, round(time_limit), script_dir, requests)
    return asyncio.run(_drive(base_url, workloads, concurrency, time_limit, requests))

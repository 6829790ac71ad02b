"""Count the CPU instructions each target spends per request, under callgrind (`make bench-instructions`).

    .venv/bin/python -m tests.perf.instructions [--requests 300] [--only bare,naive,gateway] [--levers skeleton]

Wall-clock figures on a shared 2-core machine move by ±30 % from one round to the next; instruction counts
do not. Each Python target of `make bench` runs under `valgrind --tool=callgrind` with instrumentation off;
after a warm-up, instrumentation is switched on for a fixed number of requests sent one at a time
(concurrency 1), then the counters are dumped. The figure is the user-space instructions per request of the
target's own process: the upstream stand-in, Redis and the client are not counted, and neither is the time
the kernel spends in system calls. Two runs of the same code agree to ~0.1 %, so a lever worth 1 % shows.
It ranks CPU cost, not speed: a request that waits longer on Redis costs no more instructions.

Needs valgrind (`apt-get install -y valgrind`); nginx serves the upstream stand-in when installed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from tests.perf import bench
from tests.perf import targets as t
from tests.perf.load import Workload
from tests.perf.procs import Child, Processes, wait_http

PYTHON_TARGETS = ("bare", "naive", "gateway")
DEFAULT_REQUESTS = 300
WARMUP_REQUESTS = 50
# The naive proxy builds a new httpx client (an SSL context) per request, ~600x the bare hop's instructions:
# under callgrind that is seconds per request, and the count is as stable over ten requests as over 300.
NAIVE_REQUESTS = 10
NAIVE_WARMUP_REQUESTS = 3
# Under callgrind a process runs ~50x slower: a 100 ms Redis deadline, measured on the wall clock, would
# expire while the gateway works through its own backlog and turn the run into fallback paths.
SLOWED_REDIS_TIMEOUT_MS = "20000"
_DUMP_DEADLINE_SECONDS = 60.0


@dataclass(frozen=True)
class Count:
    """Instructions one target spent on a fixed number of requests to one endpoint."""

    target: str
    endpoint: str
    requests: int
    instructions: int

    @property
    def per_request(self) -> float:
        """Return the instructions per request."""
        return self.instructions / self.requests


def callgrind_total(dump: str) -> int:
    """Return the instruction total of one callgrind dump (its `totals:` line, else its `summary:` line)."""
    values: dict[str, int] = {}
    for line in dump.splitlines():
        key, _, rest = line.partition(":")
        if key in ("totals", "summary") and rest.split():
            values[key] = int(rest.split()[0])
    if "totals" in values:
        return values["totals"]
    if "summary" in values:
        return values["summary"]
    raise ValueError("not a callgrind dump: no totals or summary line")


def _callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=120)


def _wait_for_dump(directory: Path, seen: set[Path]) -> Path:
    deadline = time.monotonic() + _DUMP_DEADLINE_SECONDS
    while time.monotonic() < deadline:
        for path in sorted(directory.glob("callgrind.out.*")):
            if path not in seen and "totals:" in path.read_text():
                return path
        time.sleep(0.05)  # polling for a file another process writes; no event to wait on
    raise TimeoutError("callgrind wrote no dump within 60 s")


def _send(client: httpx.Client, url: str, workload: Workload, count: int) -> None:
    for _ in range(count):
        response = client.request(
            workload.method,
            url + workload.path,
            headers=dict(workload.headers),
            content=workload.body or None,
        )
        if response.status_code != 200:
            raise RuntimeError(f"{workload.name}: {response.status_code} {response.text[:300]}")


def count_target(
    procs: Processes,
    workdir: Path,
    target: bench.Target,
    upstream_url: str,
    redis_url: str,
    loads: dict[str, Workload],
    endpoints: Sequence[str],
    requests: int,
) -> list[Count]:
    """Start one target under callgrind and count its instructions per endpoint."""
    directory = workdir / f"callgrind-{target.name}"
    directory.mkdir()
    prefix = (
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={directory}/callgrind.out",
    )
    child, url = bench.start_target(
        procs,
        workdir,
        target,
        upstream_url,
        redis_url,
        command_prefix=prefix,
        extra_env={"REDIS_TIMEOUT_MS": SLOWED_REDIS_TIMEOUT_MS},
    )
    if target.role == "gateway":
        wait_http(child, url + "/readyz", timeout=300, expect=200)
    else:
        wait_http(child, url + "/", timeout=300)
    warmup = WARMUP_REQUESTS
    if target.role == "naive":
        requests, warmup = min(requests, NAIVE_REQUESTS), NAIVE_WARMUP_REQUESTS
    counts: list[Count] = []
    seen: set[Path] = set()
    with httpx.Client(timeout=120) as client:
        for endpoint in endpoints:
            workload = loads[endpoint]
            _send(client, url, workload, warmup)  # caches, pooled connections, lazy imports
            _callgrind_control("--instr=on", str(child.pid))
            _send(client, url, workload, requests)
            _callgrind_control("--instr=off", str(child.pid))
            _callgrind_control("--dump", str(child.pid))
            dump = _wait_for_dump(directory, seen)
            seen.add(dump)
            counts.append(Count(target.name, endpoint, requests, callgrind_total(dump.read_text())))
    _stop(child)
    return counts


def _stop(child: Child) -> None:
    child.process.terminate()
    child.process.wait(timeout=120)


def select(only: Sequence[str], levers: Sequence[str]) -> list[bench.Target]:
    """Return the targets to count: the Python references and the gateway, plus one variant per lever."""
    names = tuple(only) or PYTHON_TARGETS
    chosen = [bench.Target(name, name) for name in PYTHON_TARGETS if name in names]
    chosen += [bench.Target(f"gateway {lever}", "gateway", (lever,)) for lever in levers]
    return chosen


def table(counts: Sequence[Count], endpoints: Sequence[str]) -> str:
    """Return a text table of thousands of instructions per request, and each target's ratio to `bare`."""
    names = list(dict.fromkeys(c.target for c in counts))
    cell = {(c.target, c.endpoint): c.per_request for c in counts}
    header = f"{'target':<28}" + "".join(f"{e:>22}" for e in endpoints)
    lines = [header, "-" * len(header)]
    for name in names:
        row = f"{name:<28}"
        for endpoint in endpoints:
            value = cell.get((name, endpoint))
            bare = cell.get(("bare", endpoint))
            text = "-" if value is None else f"{value / 1000:,.0f} k"
            if value is not None and bare and name != "bare":
                text += f" ({value / bare:.2f}x)"
            row += f"{text:>22}"
        lines.append(row)
    return "\n".join(lines)


def to_json(counts: Sequence[Count], meta: dict[str, Any]) -> dict[str, Any]:
    """Return the counts as the JSON document the run writes."""
    return {
        "meta": meta,
        "counts": [
            {
                "target": c.target,
                "endpoint": c.endpoint,
                "requests": c.requests,
                "instructions": c.instructions,
                "instructions_per_request": round(c.per_request),
            }
            for c in counts
        ],
    }


def run(
    targets: Sequence[bench.Target],
    endpoints: Sequence[str],
    requests: int,
    output_dir: Path,
    upstream: str = "auto",
) -> tuple[list[Count], Path]:
    """Count every target's instructions per request and write the JSON result; return both."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind is not installed (apt-get install -y valgrind)")
    if upstream == "auto":
        upstream = "nginx" if shutil.which("nginx") else "python"
    from service.dev_tokens import mint_token

    loads = bench.workloads(mint_token(t.JWT_SECRET, t.USER_ID, ttl=bench.TOKEN_TTL_SECONDS))
    counts: list[Count] = []
    with bench.environment(upstream, "convai-instructions-") as (procs, workdir, redis, upstream_url):
        for target in targets:
            counts += count_target(
                procs, workdir, target, upstream_url, redis.url, loads, endpoints, requests
            )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"instructions-{stamp}.json"
    meta = {"time": stamp, "upstream": upstream, "concurrency": 1, "git": bench._git_revision()}
    path.write_text(json.dumps(to_json(counts, meta), indent=2) + "\n")
    return counts, path


def main(argv: Sequence[str] | None = None) -> int:
    """Count instructions per request from the command line and print the table."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.perf.instructions", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--requests", type=int, default=DEFAULT_REQUESTS, help="measured requests per cell")
    parser.add_argument("--endpoints", nargs="+", choices=bench.ENDPOINTS, default=list(bench.ENDPOINTS))
    parser.add_argument("--only", default="", help="comma-separated: bare,naive,gateway (default all)")
    parser.add_argument("--levers", default="", help="also count gateway variants with one lever each")
    parser.add_argument("--upstream", choices=("auto", "nginx", "python"), default="auto")
    parser.add_argument("--output-dir", type=Path, default=bench.RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    levers = [lever.strip() for lever in args.levers.split(",") if lever.strip()]
    unknown = (set(only) - set(PYTHON_TARGETS)) | (set(levers) - set(t.LEVERS) - set(t.ABLATIONS))
    if unknown:
        parser.error(f"unknown target or lever: {', '.join(sorted(unknown))}")
    if any(lever.startswith("workers=") for lever in levers):
        # callgrind_control would count the supervisor, not the workers that serve the requests.
        parser.error("--levers: workers=N cannot be counted (one process is measured)")
    counts, path = run(select(only, levers), args.endpoints, args.requests, args.output_dir, args.upstream)
    print(f"thousands of instructions per request, concurrency 1, {args.requests} requests per cell:")
    print(table(counts, args.endpoints))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Profile the gateway under load with py-spy (`make profile`).

    .venv/bin/python -m tests.perf.profile [--endpoint signed-url] [--concurrency 10] [--duration 10]

Starts what the benchmark starts (a private redis-server, the upstream stand-in and the gateway with
everything on), drives one endpoint with wrk while `py-spy record` samples the gateway, then writes the
collapsed stacks to `tests/perf/results/` (feed them to any flame-graph tool) and prints the functions
holding the most samples, inclusive and exclusive. Measure a lever here before you change code for it.
Needs wrk, nginx and the permission to ptrace the gateway (root, or CAP_SYS_PTRACE).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from tests.perf import bench
from tests.perf import targets as t
from tests.perf.load import measure
from tests.perf.procs import wait_http

_LINE = re.compile(r":\d+\)$")


def summarize(collapsed: str, top: int = 25) -> str:
    """Return the `top` frames by inclusive and by exclusive share of the samples of a collapsed-stack file."""
    inclusive: Counter[str] = Counter()
    exclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        # Line numbers would split one function into many frames: aggregate by function and file.
        frames = [_LINE.sub(")", frame) for frame in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += count
        exclusive[frames[-1]] += count
    if total == 0:
        return "no samples"
    lines = [f"{total} samples"]
    for title, counter in (("inclusive", inclusive), ("exclusive", exclusive)):
        lines.append(f"-- {title}")
        lines += [f"{100 * n / total:6.1f}%  {frame}" for frame, n in counter.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the gateway under load while py-spy samples it; print and write the profile."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", choices=bench.ENDPOINTS, default="signed-url")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--rate", type=int, default=1000, help="py-spy samples per second")
    parser.add_argument("--levers", default="", help="BENCH_GATEWAY_LEVERS for the gateway (comma-separated)")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise SystemExit("py-spy is not installed (pip install -e '.[bench]')")
    if shutil.which("nginx") is None:
        raise SystemExit("nginx is needed for the upstream stand-in (apt-get install -y nginx)")

    from service.dev_tokens import mint_token

    workload = bench.workloads(mint_token(t.JWT_SECRET, t.USER_ID, ttl=bench.TOKEN_TTL_SECONDS))[
        args.endpoint
    ]
    target = bench.Target("gateway", "gateway", tuple(lever for lever in args.levers.split(",") if lever))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    bench.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    raw = bench.RESULTS_DIR / f"profile-{args.endpoint}-{stamp}.txt"
    with bench.environment("nginx", "convai-profile-") as (procs, workdir, redis, upstream_url):
        child, url = bench.start_target(procs, workdir, target, upstream_url, redis.url)
        wait_http(child, url + "/readyz", expect=200)
        bench.check_answers({"gateway": url}, {args.endpoint: workload}, [args.endpoint])
        measure(url, workload, args.concurrency, 2, workdir)  # warm-up: caches, connections
        common = [py_spy, "record", "--pid", str(child.pid), "--rate", str(args.rate)]
        common += ["--duration", str(args.duration + 1)]
        with subprocess.Popen([*common, "--format", "raw", "--output", str(raw)]) as spy:
            time.sleep(0.5)  # let py-spy attach before the load starts
            measured = measure(url, workload, args.concurrency, args.duration, workdir)
            spy.wait(timeout=args.duration + 30)
    print(f"{args.endpoint} c={args.concurrency}: {measured.requests_per_second:.0f} req/s under py-spy")
    print(summarize(raw.read_text(), args.top))
    print(f"collapsed stacks: {raw}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

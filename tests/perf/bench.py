"""Side-by-side benchmark of the gateway against a bare proxy, a naive proxy and nginx (`make bench`).

    .venv/bin/python -m tests.perf.bench [--duration 5] [--quick] [--only gateway,bare] [--levers]

One run, on loopback, bounded in time. It starts (each in its own process, killed at the end whatever
happens): a private redis-server; the upstream stand-in (nginx serving fixed payloads when nginx is
installed, else a raw-ASGI Python stand-in; see `tests.perf.targets`); and the targets, each under uvicorn
with the same settings (1 worker, uvloop, httptools, no access log, 127.0.0.1):

- `nginx`: nginx as a one-hop keep-alive proxy, the physical-limit reference;
- `bare`: a one-hop proxy written directly on aiohttp's ClientSession (no auth, no limits);
- `naive`: Starlette with a new httpx client per request, like the ElevenLabs example;
- `gateway`: the gateway with JWT verification, Redis rate limiting (policy limits raised in a
  GATEWAY_CONFIG TOML so that nothing is rejected; every request still runs its EVALSHA), the ledger,
  JSON logging (to a file) and metrics all on; with `--levers`, also gateway variants with one lever
  switched off each (httpx's transport, no token cache, asyncio+h11, 2 workers, LOG_LEVEL=WARNING).

Load comes from wrk (one thread; a generated Lua script carries the Authorization header and POST body)
at each concurrency for signed-url, list and feedback, the targets interleaved so that machine noise
spreads over all of them; with `--fresh-processes`, every Python target is started afresh for each round
(two processes of the same code differ by a few per cent). Then a memory soak: the gateway's RSS after a
warm-up and after 100,000 more requests (signed-url, list and feedback in turn). It prints req/s, p50, p99,
the ratios and the targets, and writes `bench-<time>.json` and `.png` (matplotlib, if installed) to
`tests/perf/results/`.
Absolute numbers on a shared machine are noise; the ratios measured side by side are the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from service.observability import ACCESS_LOGGER
from tests.perf import targets as t
from tests.perf.load import Measurement, Workload, generator_name, measure, soak
from tests.perf.procs import Child, Processes, sigterm_raises, wait_http
from tests.support.servers import RedisServer, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REFERENCES = ("nginx", "bare", "naive")
ENDPOINTS = ("signed-url", "list", "feedback")
TOKEN_TTL_SECONDS = 24 * 3600

# The targets.
THROUGHPUT_VS_BARE = 0.5
THROUGHPUT_VS_NAIVE = 10.0
P50_VS_BARE = 1.5
RSS_GROWTH_PERCENT = 5.0


@dataclass(frozen=True)
class Target:
    """A process under test: a reference or the gateway (optionally with levers switched off)."""

    name: str
    role: str  # nginx, bare, naive or gateway
    levers: tuple[str, ...] = ()


@dataclass
class Options:
    """What one benchmark run does."""

    duration: float = 5.0
    warmup: float = 2.0
    concurrencies: tuple[int, ...] = (1, 10, 50)
    endpoints: tuple[str, ...] = ENDPOINTS
    only: tuple[str, ...] = ()
    levers: tuple[str, ...] = ()
    rounds: int = 1
    fresh_processes: bool = False  # start every Python target afresh for each round
    soak_requests: int = 100_000
    soak_warmup: int = 10_000
    upstream: str = "auto"  # auto, nginx or python
    output_dir: Path = RESULTS_DIR
    chart: bool = True
    quiet: bool = False


@dataclass
class Run:
    """Everything a run measured."""

    options: Options
    meta: dict[str, Any] = field(default_factory=dict)
    runs: dict[tuple[str, str, int], list[Measurement]] = field(default_factory=dict)
    soak: dict[str, Any] | None = None

    def result(self, target: str, endpoint: str, concurrency: int) -> Measurement | None:
        """Return the median-throughput measurement of one cell (its latencies come with it)."""
        values = self.runs.get((target, endpoint, concurrency))
        if not values:
            return None
        ordered = sorted(values, key=lambda m: m.requests_per_second)
        return ordered[len(ordered) // 2]


def workloads(token: str) -> dict[str, Workload]:
    """Return the three benchmarked requests; every target gets the same bytes."""
    auth = {"Authorization": f"Bearer {token}"}
    return {
        "signed-url": Workload("signed-url", "GET", f"{t.SIGNED_URL_PATH}?agent_id={t.AGENT_ID}", auth),
        "list": Workload("list", "GET", f"{t.LIST_PATH}?page_size={t.LIST_PAGE_SIZE}", auth),
        "feedback": Workload(
            "feedback",
            "POST",
            t.FEEDBACK_PATH,
            {**auth, "Content-Type": "application/json"},
            '{"feedback":"like"}',
        ),
    }


def select_targets(options: Options, nginx_available: bool) -> list[Target]:
    """Return the targets of this run in a fixed order (references first), honouring `--only`."""
    chosen = [Target(name, name) for name in REFERENCES if name != "nginx" or nginx_available]
    chosen.append(Target("gateway", "gateway"))
    chosen += [Target(f"gateway-{lever}", "gateway", (lever,)) for lever in options.levers]
    if options.only:
        unknown = set(options.only) - {target.name for target in chosen}
        if unknown:
            raise SystemExit(f"--only: unknown or unavailable target(s): {', '.join(sorted(unknown))}")
        # `--only gateway,bare --levers X` means the gateway with and without X: naming the gateway keeps its
        # lever variants (before, they were dropped without a word).
        chosen = [
            target
            for target in chosen
            if target.name in options.only or (target.levers and "gateway" in options.only)
        ]
    return chosen


# --- the processes --------------------------------------------------------------------------------------


def _python_role(
    procs: Processes,
    name: str,
    role: str,
    upstream: str,
    env: dict[str, str] | None = None,
    command_prefix: Sequence[str] = (),
) -> tuple[Child, str]:
    port = free_port()
    args = [
        *command_prefix,
        sys.executable,
        "-m",
        "tests.perf.targets",
        "--role",
        role,
        "--port",
        str(port),
        "--upstream",
        upstream,
    ]
    return procs.spawn(name, args, env=env, cwd=REPO_ROOT), f"http://127.0.0.1:{port}"


def _nginx(procs: Processes, name: str, workdir: Path, conf: str) -> Child:
    nginx = shutil.which("nginx")
    assert nginx is not None
    directory = workdir / name
    directory.mkdir(exist_ok=True)
    (directory / "nginx.conf").write_text(conf)
    args = [
        nginx,
        "-p",
        str(directory),
        "-c",
        str(directory / "nginx.conf"),
        "-e",
        str(directory / "error.log"),
    ]
    return procs.spawn(name, args, cwd=directory)


@contextlib.contextmanager
def environment(upstream_kind: str, prefix: str) -> Iterator[tuple[Processes, Path, RedisServer, str]]:
    """Start a private redis-server and the upstream stand-in, seed the ledger; stop all of it on exit."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    # nginx workers drop privileges when started as root: they must be able to read the payload files.
    workdir.chmod(0o755)
    procs = Processes(workdir)
    redis = RedisServer()
    try:
        with sigterm_raises():
            redis.start()
            _, upstream_url = start_upstream(procs, workdir, upstream_kind)
            seed_ledger(redis, t.build_payloads())
            yield procs, workdir, redis, upstream_url
    finally:
        procs.close()
        redis.close()
        shutil.rmtree(workdir, ignore_errors=True)


def start_upstream(procs: Processes, workdir: Path, kind: str) -> tuple[Child, str]:
    """Start the upstream stand-in (nginx or Python) and return it with its URL."""
    if kind == "nginx":
        port = free_port()
        directory = workdir / "upstream"
        directory.mkdir(mode=0o755)
        child = _nginx(procs, "upstream", workdir, t.nginx_upstream_conf(directory, port, t.build_payloads()))
        url = f"http://127.0.0.1:{port}"
    else:
        child, url = _python_role(procs, "upstream", "standin", "")
    wait_http(child, url + "/")
    return child, url


def start_target(
    procs: Processes,
    workdir: Path,
    target: Target,
    upstream: str,
    redis_url: str,
    *,
    command_prefix: Sequence[str] = (),
    extra_env: dict[str, str] | None = None,
) -> tuple[Child, str]:
    """Start one target (not waiting for it), a Python one under `command_prefix` if given; return its URL."""
    if target.role == "nginx":
        port = free_port()
        child = _nginx(procs, target.name, workdir, t.nginx_proxy_conf(workdir / target.name, port, upstream))
        return child, f"http://127.0.0.1:{port}"
    if target.role != "gateway":
        return _python_role(procs, target.name, target.role, upstream, command_prefix=command_prefix)
    config = workdir / "gateway.toml"
    t.write_gateway_config(config)
    log_level = "WARNING" if "log-warning" in target.levers else "INFO"
    env = t.gateway_environment(upstream, redis_url, config, log_level)
    env["BENCH_GATEWAY_LEVERS"] = ",".join(target.levers)
    if any(lever.startswith("workers=") for lever in target.levers):
        env["PROMETHEUS_MULTIPROC_DIR"] = str(Path(tempfile.mkdtemp(prefix="metrics-", dir=workdir)))
    env.update(extra_env or {})
    return _python_role(procs, target.name, "gateway", upstream, env, command_prefix)


def seed_ledger(redis: RedisServer, payloads: t.Payloads) -> None:
    """Record the bench user as the owner of the listed and the rated conversations (as mints would)."""
    from service.ledger import LedgerEntry, encode_entry, ledger_key

    entry = encode_entry(LedgerEntry(t.USER_ID, t.AGENT_ID, int(time.time())))
    with contextlib.closing(redis.client()) as client:
        for conversation_id in (*payloads.list_ids, t.FEEDBACK_CONVERSATION):
            client.set(ledger_key(conversation_id), entry, ex=86_400)


def check_answers(urls: dict[str, str], loads: dict[str, Workload], endpoints: Sequence[str]) -> None:
    """Send each request once to each target and fail loudly unless it answers 200 with the right shape."""
    with httpx.Client(timeout=10) as client:
        for name, url in urls.items():
            for endpoint in endpoints:
                w = loads[endpoint]
                response = client.request(
                    w.method, url + w.path, headers=dict(w.headers), content=w.body or None
                )
                body: Any = response.json() if response.status_code == 200 else {}
                key = {"signed-url": "signed_url", "list": "conversations", "feedback": None}[endpoint]
                if response.status_code != 200 or (key is not None and key not in body):
                    raise RuntimeError(f"{name} {endpoint}: {response.status_code} {response.text[:500]}")


# --- the run --------------------------------------------------------------------------------------------


def _say(options: Options, message: str) -> None:
    if not options.quiet:
        print(message, flush=True)


def estimate_seconds(options: Options, target_count: int) -> float:
    """Return the run's approximate length in seconds (load only, start-up excluded)."""
    cells = target_count * len(options.endpoints) * len(options.concurrencies) * options.rounds
    warm = target_count * len(options.endpoints) * options.warmup
    soak_seconds = (options.soak_requests + options.soak_warmup) / 1000 if options.soak_requests else 0
    return cells * max(1.0, options.duration) + warm + soak_seconds


def run(options: Options) -> tuple[Run, Path]:
    """Run the benchmark, write the JSON (and chart) and return the run with the JSON's path."""
    from service.dev_tokens import mint_token

    nginx_available = shutil.which("nginx") is not None
    if options.upstream == "nginx" and not nginx_available:
        raise SystemExit("--upstream nginx: nginx is not installed (apt-get install -y nginx)")
    upstream_kind = (
        options.upstream if options.upstream != "auto" else ("nginx" if nginx_available else "python")
    )
    chosen = select_targets(options, nginx_available)
    result = Run(options)
    token = mint_token(t.JWT_SECRET, t.USER_ID, ttl=TOKEN_TTL_SECONDS)
    loads = workloads(token)
    result.meta = _meta(options, upstream_kind, nginx_available, chosen)
    _say(options, f"# {json.dumps(result.meta['machine'])} load={result.meta['load_generator']}")
    _say(options, f"# targets: {', '.join(x.name for x in chosen)}; upstream stand-in: {upstream_kind}")
    _say(options, f"# about {estimate_seconds(options, len(chosen)):.0f} s of load")

    with environment(upstream_kind, "convai-bench-") as (procs, workdir, redis, upstream_url):
        roles = {x.name: x.role for x in chosen}
        children = _start_targets(procs, workdir, chosen, upstream_url, redis.url)
        result.meta["processes"] = {child.name: child.pid for child in procs.children}
        result.meta["processes"]["redis"] = redis.process.pid if redis.process else None
        check_answers({name: url for name, (_, url) in children.items()}, loads, options.endpoints)

        def restart(round_number: int, running: dict[str, tuple[Child, str]]) -> dict[str, tuple[Child, str]]:
            # nginx stays: it is the physical limit, not a Python process with a layout of its own.
            python = [x for x in chosen if x.role != "nginx"]
            for target in python:
                procs.stop(running[target.name][0])
            renamed = [replace(x, name=f"{x.name}.round{round_number}") for x in python]
            fresh = _start_targets(procs, workdir, renamed, upstream_url, redis.url)
            result.meta["processes"].update({child.name: child.pid for child, _ in fresh.values()})
            return {**running, **{x.name: fresh[r.name] for x, r in zip(python, renamed, strict=True)}}

        children = _measure_all(
            options, result, children, loads, workdir, restart if options.fresh_processes else None
        )
        gateway = children.get("gateway")
        if gateway is not None and options.soak_requests > 0:
            result.soak = _soak(options, gateway[0], gateway[1], loads, workdir)
        for name, (child, _) in children.items():
            if roles[name] == "gateway":
                result.meta.setdefault("gateway_log_lines", {})[name] = _count_lines(child.log_path)
    path = write_results(result)
    return result, path


def _start_targets(
    procs: Processes, workdir: Path, chosen: Sequence[Target], upstream: str, redis_url: str
) -> dict[str, tuple[Child, str]]:
    """Start `chosen` together, wait until each answers (a gateway: ready), and return them by name."""
    started = {x.name: (x, *start_target(procs, workdir, x, upstream, redis_url)) for x in chosen}
    for target, child, url in started.values():
        if target.role == "gateway":
            wait_http(child, url + "/readyz", expect=200)
        else:
            wait_http(child, url + "/")
    return {name: (child, url) for name, (_, child, url) in started.items()}


def _meta(
    options: Options, upstream_kind: str, nginx_available: bool, chosen: Sequence[Target]
) -> dict[str, Any]:
    return {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(terse=True),
        },
        "git": _git_revision(),
        "load_generator": generator_name(),
        "upstream": upstream_kind,
        "nginx_reference": nginx_available,
        "duration_s": options.duration,
        "warmup_s": options.warmup,
        "rounds": options.rounds,
        "fresh_processes": options.fresh_processes,
        "concurrencies": list(options.concurrencies),
        "endpoints": list(options.endpoints),
        "targets": [{"name": x.name, "role": x.role, "levers_off": list(x.levers)} for x in chosen],
        "uvicorn": {k: v for k, v in t.UVICORN_SETTINGS.items()},
        "gateway_http": t.GATEWAY_HTTP_PROTOCOL,
        "gateway_rate_limits": (
            f"user-session, agent-session, user-history, user-feedback raised to {t.RAISED_LIMIT} per 1 s "
            "(burst the same) in GATEWAY_CONFIG so the load is not rejected; each request still runs EVALSHA"
        ),
    }


def _git_revision() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip() or None


def _measure_all(
    options: Options,
    result: Run,
    started: dict[str, tuple[Child, str]],
    loads: dict[str, Workload],
    workdir: Path,
    restart: Callable[[int, dict[str, tuple[Child, str]]], dict[str, tuple[Child, str]]] | None = None,
) -> dict[str, tuple[Child, str]]:
    """Measure every cell, round after round (each round on fresh processes with `restart`); return the last."""
    top = max(options.concurrencies)
    for round_number in range(1, options.rounds + 1):
        if restart is not None and round_number > 1:
            started = restart(round_number, started)
        if round_number == 1 or restart is not None:
            for endpoint in options.endpoints if options.warmup > 0 else ():
                for _, url in started.values():
                    measure(url, loads[endpoint], top, options.warmup, workdir)
        for endpoint in options.endpoints:
            for concurrency in options.concurrencies:
                for name, (child, url) in started.items():
                    # CPU time per request is far steadier than req/s on a shared machine: it attributes
                    # costs even when other processes steal cycles.
                    cpu_before = child.cpu_seconds()
                    m = measure(url, loads[endpoint], concurrency, options.duration, workdir)
                    cpu = (child.cpu_seconds() - cpu_before) * 1e6 / max(1, m.requests)
                    m = replace(m, cpu_us_per_request=round(cpu, 1))
                    result.runs.setdefault((name, endpoint, concurrency), []).append(m)
                    _say(
                        options,
                        f"  round {round_number} {endpoint:<10} c={concurrency:<3} {name:<24}"
                        f"{m.requests_per_second:9.0f} req/s  p50 {m.p50_ms:7.2f} ms  p99 {m.p99_ms:8.2f} ms"
                        f"  cpu {cpu:7.0f} us/req" + (f"  ERRORS {m.errors}" if m.errors else ""),
                    )
    return started


def _soak(
    options: Options, child: Child, url: str, loads: dict[str, Workload], workdir: Path
) -> dict[str, Any]:
    mixed = [loads[name] for name in ENDPOINTS]
    concurrency = max(options.concurrencies)
    _say(
        options,
        f"# soak: {options.soak_warmup} warm-up requests, then {options.soak_requests} (c={concurrency})",
    )
    logged_before = child.log_path.stat().st_size
    warm = soak(url, mixed, options.soak_warmup, concurrency, workdir) if options.soak_warmup else None
    before = child.rss_kib()
    began = time.perf_counter()
    done = soak(url, mixed, options.soak_requests, concurrency, workdir)
    elapsed = time.perf_counter() - began
    after = child.rss_kib()
    growth = 100.0 * (after - before) / before
    problems = gateway_log_problems(child.log_path, logged_before)
    _say(
        options,
        f"# soak: RSS {before} KiB -> {after} KiB ({growth:+.2f} %), {done.requests} requests in {elapsed:.0f} s",
    )
    if problems["responses_5xx"] or problems["warnings"]:
        _say(options, f"# soak: the gateway logged {json.dumps(problems)}")
    return {
        "warmup_requests": warm.requests if warm else 0,
        "requests": done.requests,
        "errors": done.errors + (warm.errors if warm else 0),
        "seconds": round(elapsed, 1),
        "requests_per_second": round(done.requests_per_second, 1),
        "rss_before_kib": before,
        "rss_after_kib": after,
        "rss_growth_percent": round(growth, 2),
        "mix": list(ENDPOINTS),
        "concurrency": concurrency,
        "gateway_log": problems,
    }


def gateway_log_problems(path: Path, offset: int = 0) -> dict[str, dict[str, int]]:
    """Count the 5xx access lines (by status) and WARNING+ messages a gateway's JSON log holds after `offset`."""
    # A soak's failed requests are otherwise just a number; the gateway's own log says what they were.
    statuses: Counter[str] = Counter()
    warnings: Counter[str] = Counter()
    with path.open("rb") as handle:
        handle.seek(offset)
        for raw in handle:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(line, dict):
                continue
            status = line.get("status")
            if line.get("logger") == ACCESS_LOGGER and isinstance(status, int) and status >= 500:
                statuses[str(status)] += 1
            elif line.get("level") in ("WARNING", "ERROR", "CRITICAL"):
                warnings[str(line.get("msg"))[:120]] += 1
    return {"responses_5xx": dict(statuses), "warnings": dict(warnings.most_common(5))}


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for _ in handle)


# --- ratios, targets, output ------------------------------------------------------------------------------


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def ratios(result: Run) -> list[dict[str, Any]]:
    """Return gateway-vs-reference ratios (throughput and p50) for every cell the run measured."""
    rows = []
    for endpoint in result.options.endpoints:
        for concurrency in result.options.concurrencies:
            gw = result.result("gateway", endpoint, concurrency)
            if gw is None:
                continue
            for reference in REFERENCES:
                ref = result.result(reference, endpoint, concurrency)
                if ref is None:
                    continue
                rows.append(
                    {
                        "endpoint": endpoint,
                        "concurrency": concurrency,
                        "reference": reference,
                        "throughput_ratio": round(gw.requests_per_second / ref.requests_per_second, 3),
                        "p50_ratio": round(gw.p50_ms / ref.p50_ms, 3) if ref.p50_ms else None,
                    }
                )
    return rows


def target_checks(result: Run) -> list[dict[str, Any]]:
    """Evaluate the issue's targets on what the run measured (a target not measured is left out)."""
    checks: list[dict[str, Any]] = []

    def add(label: str, value: float | None, bound: float, at_least: bool) -> None:
        if value is None:
            return
        met = value >= bound if at_least else value <= bound
        checks.append(
            {"target": label, "value": round(value, 3), "bound": bound, "at_least": at_least, "met": met}
        )

    top = max(result.options.concurrencies)
    if "signed-url" in result.options.endpoints and top == 50:
        gw = result.result("gateway", "signed-url", 50)
        bare = result.result("bare", "signed-url", 50)
        naive = result.result("naive", "signed-url", 50)
        add(
            "signed-url req/s at c=50: gateway / bare", _ratio(_rps(gw), _rps(bare)), THROUGHPUT_VS_BARE, True
        )
        add(
            "signed-url req/s at c=50: gateway / naive",
            _ratio(_rps(gw), _rps(naive)),
            THROUGHPUT_VS_NAIVE,
            True,
        )
    if 1 in result.options.concurrencies:
        for endpoint in result.options.endpoints:
            gw = result.result("gateway", endpoint, 1)
            bare = result.result("bare", endpoint, 1)
            add(
                f"{endpoint} p50 at c=1: gateway / bare",
                _ratio(gw.p50_ms if gw else None, bare.p50_ms if bare else None),
                P50_VS_BARE,
                False,
            )
    if result.soak is not None and result.soak["requests"] >= 100_000:
        add(
            f"RSS growth over {result.soak['requests']} requests (%)",
            result.soak["rss_growth_percent"],
            RSS_GROWTH_PERCENT,
            False,
        )
    return checks


def _rps(m: Measurement | None) -> float | None:
    return None if m is None else m.requests_per_second


def to_json(result: Run) -> dict[str, Any]:
    """Return the whole run as a JSON-ready dict."""
    cells = []
    for (target, endpoint, concurrency), values in result.runs.items():
        median = result.result(target, endpoint, concurrency)
        assert median is not None
        cells.append(
            {
                "target": target,
                "endpoint": endpoint,
                "concurrency": concurrency,
                **median.as_json(),
                "rounds_rps": [round(v.requests_per_second, 1) for v in values],
            }
        )
    return {
        "meta": result.meta,
        "results": cells,
        "ratios": ratios(result),
        "targets": target_checks(result),
        "soak": result.soak,
    }


def table(result: Run) -> str:
    """Return the results table with ratios against each reference."""
    names = list(dict.fromkeys(target for target, _, _ in result.runs))
    lines = [
        f"{'endpoint':<11}{'conc':>5}  {'target':<24}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'cpu us':>8}"
        f"{'errors':>7}{'gw/bare':>9}{'gw/naive':>9}{'gw/nginx':>9}"
    ]
    for endpoint in result.options.endpoints:
        for concurrency in result.options.concurrencies:
            for name in names:
                m = result.result(name, endpoint, concurrency)
                if m is None:
                    continue
                extra = ""
                if name == "gateway":
                    for reference in ("bare", "naive", "nginx"):
                        r = _ratio(
                            m.requests_per_second, _rps(result.result(reference, endpoint, concurrency))
                        )
                        extra += f"{r:>8.2f}x" if r is not None else f"{'-':>9}"
                lines.append(
                    f"{endpoint:<11}{concurrency:>5}  {name:<24}{m.requests_per_second:>9.0f}{m.p50_ms:>9.2f}"
                    f"{m.p99_ms:>9.2f}{m.cpu_us_per_request or 0:>8.0f}{m.errors:>7}{extra}"
                )
        lines.append("")
    return "\n".join(lines)


def targets_text(result: Run) -> str:
    """Return one line per target: value, bound and met / NOT met."""
    lines = []
    for check in target_checks(result):
        op = ">=" if check["at_least"] else "<="
        verdict = "met" if check["met"] else "NOT met"
        lines.append(
            f"  {check['target']:<52} {check['value']:>8.2f}  (target {op} {check['bound']:g})  {verdict}"
        )
    return "\n".join(lines)


def write_results(result: Run) -> Path:
    """Write `bench-<time>.json` (and the `.png` chart when matplotlib is installed); return the JSON path."""
    directory = result.options.output_dir
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = directory / f"bench-{stamp}.json"
    data = to_json(result)
    if result.options.chart:
        chart = path.with_suffix(".png")
        if draw_chart(result, chart):
            data["meta"]["chart"] = chart.name
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def draw_chart(result: Run, path: Path) -> bool:
    """Draw req/s and p50 per endpoint, concurrency and target into `path`; False without matplotlib."""
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
    except ImportError:
        return False
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")
    names = list(dict.fromkeys(target for target, _, _ in result.runs))
    endpoints = result.options.endpoints
    concurrencies = result.options.concurrencies
    figure, axes = plt.subplots(2, len(endpoints), figsize=(5 * len(endpoints), 7.5), squeeze=False)
    width = 0.8 / max(1, len(names))
    for column, endpoint in enumerate(endpoints):
        for row, (metric, label) in enumerate((("requests_per_second", "req/s"), ("p50_ms", "p50 ms"))):
            ax = axes[row][column]
            for index, name in enumerate(names):
                values = []
                for concurrency in concurrencies:
                    m = result.result(name, endpoint, concurrency)
                    values.append(getattr(m, metric) if m is not None else 0.0)
                positions = [c + (index - (len(names) - 1) / 2) * width for c in range(len(concurrencies))]
                ax.bar(positions, values, width, label=name)
            ax.set_xticks(range(len(concurrencies)))
            ax.set_xticklabels([f"c={c}" for c in concurrencies])
            ax.set_title(f"{endpoint}: {label}")
            ax.set_yscale("log")  # nginx, the Python proxies and the naive one are orders of magnitude apart
    axes[0][0].legend(fontsize="small")
    meta = result.meta
    figure.suptitle(
        f"convai-gateway vs references ({meta['machine']['cpus']} CPUs, {meta['load_generator']}, "
        f"{meta['duration_s']:g} s per cell, upstream {meta['upstream']})"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


# --- command line ------------------------------------------------------------------------------------------


def parse_options(argv: Sequence[str] | None = None) -> Options:
    """Parse the command line into Options."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.perf.bench", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--duration", type=float, help="seconds per measurement (default 5; --quick 1)")
    parser.add_argument(
        "--warmup", type=float, help="seconds of warm-up per target and endpoint (default 2, 0 = none)"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", help="concurrency levels (default 1 10 50)")
    parser.add_argument("--endpoints", nargs="+", choices=ENDPOINTS, help="endpoints (default all three)")
    parser.add_argument("--only", help="comma-separated targets: nginx,bare,naive,gateway (default all)")
    parser.add_argument(
        "--levers",
        nargs="?",
        const=",".join(t.LEVERS),
        default="",
        help=f"also run gateway variants with one lever off each (default {','.join(t.LEVERS)}; "
        f"ablations: {','.join(t.ABLATIONS)})",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat every cell and keep the median (default 1)"
    )
    parser.add_argument(
        "--fresh-processes",
        action="store_true",
        help="start every Python target afresh for each round: two processes of the same code differ by a few "
        "per cent, so medians over --rounds N then span N processes each",
    )
    parser.add_argument(
        "--soak-requests", type=int, help="requests of the memory soak (default 100000, 0 = none)"
    )
    parser.add_argument("--soak-warmup", type=int, help="warm-up requests before the soak (default 10000)")
    parser.add_argument("--upstream", choices=("auto", "nginx", "python"), default="auto")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    parser.add_argument(
        "--quick", action="store_true", help="a short run: 1 s cells, c=1 and 10, a 2,000-request soak"
    )
    args = parser.parse_args(argv)
    options = Options(
        upstream=args.upstream,
        output_dir=args.output_dir,
        chart=not args.no_chart,
        rounds=args.rounds,
        fresh_processes=args.fresh_processes,
    )
    if args.quick:
        options.duration, options.warmup, options.concurrencies = 1.0, 0.5, (1, 10)
        options.soak_requests, options.soak_warmup = 2_000, 500
    if args.duration is not None:
        options.duration = args.duration
    if args.warmup is not None:
        options.warmup = args.warmup
    if args.concurrency:
        options.concurrencies = tuple(args.concurrency)
    if args.endpoints:
        options.endpoints = tuple(args.endpoints)
    if args.only:
        options.only = tuple(name.strip() for name in args.only.split(",") if name.strip())
    options.levers = tuple(lever.strip() for lever in args.levers.split(",") if lever.strip())
    unknown = set(options.levers) - set(t.LEVERS) - set(t.ABLATIONS)
    if unknown:
        parser.error(f"--levers: unknown {', '.join(sorted(unknown))}")
    if args.soak_requests is not None:
        options.soak_requests = args.soak_requests
    if args.soak_warmup is not None:
        options.soak_warmup = args.soak_warmup
    return options


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark from the command line and print the tables."""
    options = parse_options(argv)
    result, path = run(options)
    print()
    print(table(result))
    checks = targets_text(result)
    if checks:
        print("targets:")
        print(checks)
    if result.soak is not None:
        s = result.soak
        print(
            f"soak: {s['requests']} requests ({s['errors']} errors): RSS {s['rss_before_kib']} -> "
            f"{s['rss_after_kib']} KiB ({s['rss_growth_percent']:+.2f} %)"
        )
    print(
        f"results: {path}"
        + (f" and {path.with_suffix('.png').name}" if path.with_suffix(".png").exists() else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

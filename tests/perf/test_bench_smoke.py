"""A few seconds of the real benchmark machinery against the gateway and the bare proxy (never a speed)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from tests.perf.bench import ENDPOINTS, Run, parse_options, run, table


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _quick_run(tmp_path: Path, *args: str) -> tuple[Run, Path, dict[str, Any]]:
    """Run a quick bench of the gateway and the bare proxy with `args`; return the run, its JSON file and data."""
    options = parse_options(["--quick", "--only", "gateway,bare", "--output-dir", str(tmp_path), *args])
    options.quiet = True
    result, path = run(options)
    return result, path, json.loads(path.read_text())


def test_quick_bench_measures_gateway_and_bare_proxy_and_writes_json(tmp_path: Path) -> None:
    result, path, data = _quick_run(
        tmp_path, "--soak-requests", "1000", "--soak-warmup", "200", "--concurrency", "10", "--warmup", "0"
    )

    cells = {(cell["target"], cell["endpoint"]): cell for cell in data["results"]}
    assert set(cells) == {(target, endpoint) for target in ("gateway", "bare") for endpoint in ENDPOINTS}
    for cell in cells.values():
        assert cell["concurrency"] == 10
        assert cell["requests"] > 10
        assert cell["errors"] == 0, cell
        assert cell["requests_per_second"] > 0
        assert 0 < cell["p50_ms"] <= cell["p99_ms"] < 10_000
        assert cell["cpu_us_per_request"] > 0
    # Ratios are reported against the bare proxy (whatever they are) and named per endpoint.
    assert {(r["endpoint"], r["reference"]) for r in data["ratios"]} == {(e, "bare") for e in ENDPOINTS}
    assert all(r["throughput_ratio"] > 0 for r in data["ratios"])
    soak = data["soak"]
    assert soak["requests"] >= 1_000 and soak["errors"] == 0
    assert soak["rss_before_kib"] > 0 and soak["rss_after_kib"] > 0
    # The gateway really ran with logging on: one access line per request at least.
    assert data["meta"]["gateway_log_lines"]["gateway"] >= soak["requests"]
    assert "raised" in data["meta"]["gateway_rate_limits"]
    assert "gateway" in table(result) and "bare" in table(result)
    # The chart comes with matplotlib (the `bench` extra); without it the JSON says there is none.
    chart = path.with_suffix(".png")
    if importlib.util.find_spec("matplotlib") is not None:
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert data["meta"]["chart"] == chart.name
    else:
        assert not chart.exists() and "chart" not in data["meta"]
    # Every process the run started is gone.
    pids = [pid for pid in data["meta"]["processes"].values() if pid]
    assert len(pids) >= 4
    assert not [pid for pid in pids if _alive(pid)]


def test_fresh_processes_measure_each_round_on_new_target_processes(tmp_path: Path) -> None:
    _, _, data = _quick_run(
        tmp_path,
        "--rounds",
        "3",
        "--fresh-processes",
        "--soak-requests",
        "0",
        "--endpoints",
        "signed-url",
        "--concurrency",
        "1",
    )

    assert data["meta"]["fresh_processes"] is True
    processes = data["meta"]["processes"]
    # Rounds 2 and 3 ran on processes of their own, not on an earlier round's.
    names = ("gateway", "gateway.round2", "gateway.round3", "bare", "bare.round2", "bare.round3")
    assert set(names) <= set(processes)
    assert len({processes[name] for name in names}) == len(names)
    for cell in data["results"]:
        assert len(cell["rounds_rps"]) == 3 and all(rps > 0 for rps in cell["rounds_rps"]), cell
        assert cell["errors"] == 0, cell
    assert not [pid for pid in processes.values() if pid and _alive(pid)]

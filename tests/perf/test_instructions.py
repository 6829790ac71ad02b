"""The instruction counter: its dump parsing, and a short real run under callgrind (never a speed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.perf import instructions
from tests.perf.bench import Target


def test_callgrind_total_prefers_the_totals_line() -> None:
    dump = "version: 1\ncmd: python\nsummary: 0\nfn=(1) main\n16 3\ntotals: 127867937\n"

    assert instructions.callgrind_total(dump) == 127_867_937


def test_callgrind_total_falls_back_to_the_summary_line() -> None:
    assert instructions.callgrind_total("events: Ir\nsummary: 4242\n") == 4242


def test_callgrind_total_refuses_text_that_is_no_dump() -> None:
    with pytest.raises(ValueError, match="not a callgrind dump"):
        instructions.callgrind_total("events: Ir\n")


def test_select_adds_one_gateway_variant_per_lever() -> None:
    chosen = instructions.select(["bare", "gateway"], ["no-logging"])

    assert chosen == [
        Target("bare", "bare"),
        Target("gateway", "gateway"),
        Target("gateway no-logging", "gateway", ("no-logging",)),
    ]


def test_main_refuses_a_worker_count_lever() -> None:
    with pytest.raises(SystemExit) as exc:
        instructions.main(["--levers", "workers=2"])

    assert exc.value.code == 2


def test_run_counts_the_bare_hop_under_callgrind_and_writes_json(tmp_path: Path) -> None:
    counts, path = instructions.run([Target("bare", "bare")], ["signed-url"], 20, tmp_path)

    (count,) = counts
    assert (count.target, count.endpoint, count.requests) == ("bare", "signed-url", 20)
    # A proxied HTTP request through uvicorn and aiohttp is hundreds of thousands of instructions; fewer
    # would mean the counter missed the requests (instrumentation switched on too late), far more that it
    # counted the start-up or the warm-up too.
    assert 100_000 < count.per_request < 5_000_000
    data = json.loads(path.read_text())
    assert data["counts"] == [
        {
            "target": "bare",
            "endpoint": "signed-url",
            "requests": 20,
            "instructions": count.instructions,
            "instructions_per_request": round(count.per_request),
        }
    ]
    assert data["meta"]["concurrency"] == 1

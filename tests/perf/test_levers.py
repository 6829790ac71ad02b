"""The benchmark's lever names: what `--levers` accepts and what the gateway process switches off."""

from __future__ import annotations

import asyncio
import importlib

import pytest
from redis.asyncio.connection import ConnectionPool
from uvicorn.importer import import_from_string

from service import server_protocol, upstream
from service.redis_client import QuickCheckoutPool
from service.responses import JsonAnswer
from service.server_protocol import HeaderDeadlineProtocol
from tests.perf.bench import parse_options, select_targets
from tests.perf.targets import (
    GATEWAY_HTTP_PROTOCOL,
    SKELETON_REMOVES,
    expand_levers,
    plain_json_users,
    split_head,
    stdlib_json,
    stdlib_parse,
    stock_redis_pool,
    uvicorn_settings,
)


def test_skeleton_stands_for_every_feature_ablation() -> None:
    assert expand_levers({"skeleton"}) == {"no-logging", "no-ratelimit", "no-ledger-write", "no-metrics"}
    assert set(SKELETON_REMOVES) <= expand_levers({"skeleton", "asyncio"})
    assert "asyncio" in expand_levers({"skeleton", "asyncio"})


def test_levers_without_skeleton_are_kept_as_given() -> None:
    assert expand_levers({"no-logging", "asyncio"}) == {"no-logging", "asyncio"}


def test_each_lever_becomes_its_own_gateway_target() -> None:
    options = parse_options(["--levers", "skeleton,no-redis-pipelining"])
    names = [target.name for target in select_targets(options, nginx_available=False)]
    assert names[-3:] == ["gateway", "gateway-skeleton", "gateway-no-redis-pipelining"]


def test_only_gateway_keeps_its_lever_variants() -> None:
    options = parse_options(["--only", "gateway,bare", "--levers", "skeleton"])
    names = [target.name for target in select_targets(options, nginx_available=True)]
    assert names == ["bare", "gateway", "gateway-skeleton"]
    options = parse_options(["--only", "bare,gateway-skeleton", "--levers", "skeleton"])
    assert [target.name for target in select_targets(options, nginx_available=True)] == [
        "bare",
        "gateway-skeleton",
    ]


def test_unknown_lever_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_options(["--levers", "no-such-lever"])
    assert exc.value.code == 2
    assert "no-such-lever" in capsys.readouterr().err


def test_gateway_runs_under_the_protocol_serve_ships(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BENCH_GATEWAY_LEVERS", raising=False)
    assert import_from_string(uvicorn_settings("gateway")["http"]) is HeaderDeadlineProtocol
    assert import_from_string(GATEWAY_HTTP_PROTOCOL) is HeaderDeadlineProtocol


def test_references_keep_plain_httptools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BENCH_GATEWAY_LEVERS", raising=False)
    assert {uvicorn_settings(role)["http"] for role in ("bare", "naive", "standin")} == {"httptools"}


def test_no_header_deadline_lever_runs_plain_httptools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_GATEWAY_LEVERS", "no-header-deadline")
    assert uvicorn_settings("gateway")["http"] == "httptools"


def test_stock_redis_pool_lever_puts_redis_pys_checkout_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # Set through monkeypatch first, so that the lever's change to the class is undone after the test.
    monkeypatch.setattr(QuickCheckoutPool, "get_connection", QuickCheckoutPool.get_connection)
    monkeypatch.setattr(QuickCheckoutPool, "release", QuickCheckoutPool.release)
    assert QuickCheckoutPool.get_connection is not ConnectionPool.get_connection
    stock_redis_pool()
    assert QuickCheckoutPool.get_connection is ConnectionPool.get_connection
    assert QuickCheckoutPool.release is ConnectionPool.release


def test_stdlib_json_lever_renders_through_the_c_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    users = plain_json_users()
    assert {"service.responses", "service.observability", "service.ledger"} <= set(users)
    for name in users:  # undone after the test
        monkeypatch.setattr(f"{name}.plain_json", importlib.import_module(name).plain_json)
    assert JsonAnswer({"ratio": 1e-05}).body == b'{"ratio":0.00001}'  # orjson's spelling
    stdlib_json()
    assert JsonAnswer({"ratio": 1e-05}).body == b'{"ratio":1e-05}'  # CPython's
    assert all(importlib.import_module(name).plain_json.__name__ == "refuse" for name in users)
    assert plain_json_users() == []  # no module left rendering through orjson


def test_split_head_lever_writes_heads_on_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_protocol, "HeadWithBodyTransport", server_protocol.HeadWithBodyTransport)
    transport = asyncio.Transport()
    assert isinstance(server_protocol.HeadWithBodyTransport(transport), server_protocol.HeadWithBodyTransport)
    split_head()
    assert server_protocol.HeadWithBodyTransport(transport) is transport


def test_stdlib_parse_lever_leaves_upstreams_answers_to_the_stdlib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream, "parse_json", upstream.parse_json)
    stdlib_parse()
    assert upstream.parse_json is upstream.parse_json_with_stdlib
    assert upstream.parse_json(b'{"a":[1,2.5]}') == {"a": [1, 2.5]}

"""The benchmark's lever names: what `--levers` accepts and what the gateway process switches off."""

from __future__ import annotations

import pytest

from tests.perf.bench import parse_options, select_targets
from tests.perf.targets import SKELETON_REMOVES, expand_levers


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


def test_unknown_lever_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_options(["--levers", "no-such-lever"])
    assert exc.value.code == 2
    assert "no-such-lever" in capsys.readouterr().err

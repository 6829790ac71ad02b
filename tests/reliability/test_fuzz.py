"""Fuzzing the gateway's own OpenAPI document with schemathesis: every operation, every check.

The gateway is served by uvicorn on loopback (real Redis, the session's emulator) and the schema is
loaded from its own `/openapi.json`. For each operation schemathesis generates requests that fit the
schema (positive) and requests that break it (negative), sends them with a valid bearer token and runs
all of its checks on each response: no 5xx, status codes, content types, headers and bodies as
documented, invalid data rejected, valid data accepted, authentication not ignored. Generation is
derandomized and bounded (RELIABILITY_SCALE enlarges it), so a CI run is repeatable.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.core.result import Ok
from schemathesis.generation import GenerationMode

from tests.reliability.support import (
    GENEROUS_LIMITS,
    ServedGateway,
    bearer,
    scaled,
    served_gateway,
    write_config,
)

EXAMPLES_PER_OPERATION = 120
# schemathesis's default rejections plus 413 (an oversized body) and minus 5xx (never a rejection here).
REJECTIONS = ("400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429")


@pytest.fixture
def fuzzed(emulator_url: str, redis_url: str, tmp_path: Path) -> Iterator[ServedGateway]:
    """Serve a gateway whose limits fuzzing never reaches (429s would only hide other answers)."""
    with served_gateway(
        emulator_url,
        redis_url,
        GATEWAY_CONFIG=write_config(tmp_path, GENEROUS_LIMITS),
        UPSTREAM_MAX_RETRIES="0",
    ) as gateway:
        yield gateway


def all_checks() -> list[Any]:
    """Return every check schemathesis knows."""
    load_all_checks()
    return list(CHECKS.get_all())


def fuzz(
    operation: APIOperation[Any, Any, Any, Any],
    mode: GenerationMode,
    base_url: str,
    headers: dict[str, str],
    checks: list[Any],
    examples: int,
) -> int:
    """Send up to `examples` generated requests for `operation` and validate each answer; return the count."""
    sent = 0

    @settings(
        max_examples=examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        nonlocal sent
        case = data.draw(operation.as_strategy(generation_mode=mode))
        if mode is GenerationMode.POSITIVE and isinstance(case.query, dict):
            # A cursor is opaque and sealed to its user: a generated one is a forgery, rightly a 422
            # (tests/test_cursors.py); positive cases page from the start instead.
            case.query.pop("cursor", None)
        response = case.call(base_url=base_url, headers=headers, timeout=10)
        sent += 1
        case.validate_response(
            response,
            checks=checks,
            headers=headers,
            transport_kwargs={"base_url": base_url, "headers": headers},
        )

    run()
    return sent


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"]
)
def test_schemathesis_finds_no_failure_in_any_operation(fuzzed: ServedGateway, mode: GenerationMode) -> None:
    # ASCII strings: the document's "printable" patterns cannot spell Python's unicode printability rule
    # exactly; unicode in ids, users and headers is covered by the hostile-input table and the isolation
    # property instead.
    # 413 and 415 are how the gateway rejects an oversized or non-JSON body (both documented): rejections.
    config = schemathesis.Config.from_dict(
        {
            "generation": {"codec": "ascii"},
            "checks": {"negative_data_rejection": {"expected-statuses": [*REJECTIONS]}},
        }
    )
    schema = schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json", config=config)
    results = list(schema.get_all_operations())
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) == len(results), "every operation of the document must load"
    assert len(operations) >= 10, "the document must describe every route"
    checks = all_checks()
    headers = bearer("fuzz-user", scopes="convai:session convai:history convai:delete")
    tried: dict[str, int] = {}

    for operation in operations:
        takes_input = any(len(part) for part in (operation.query, operation.path_parameters, operation.body))
        if mode is GenerationMode.NEGATIVE and not takes_input:
            continue  # nothing to break (healthz, readyz, metrics, openapi.json take no input)
        tried[operation.label] = fuzz(
            operation, mode, fuzzed.url, headers, checks, scaled(EXAMPLES_PER_OPERATION)
        )
    assert all(count > 0 for count in tried.values()), tried
    assert not any("unhandled error" in line for line in fuzzed.logs)
    print(f"\nschemathesis {mode.value}: {sum(tried.values())} requests over {len(tried)} operations")

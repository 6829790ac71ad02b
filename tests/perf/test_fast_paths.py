"""The performance changes the benchmark led to behave exactly like the code they replaced."""

from __future__ import annotations

import json
import string
from urllib.parse import parse_qsl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.responses import JSONResponse

from service.compact_json import NotPlainJson, plain_json
from service.observability import _SECRET_PATTERNS, Metrics, mask_secrets
from service.responses import JsonAnswer
from service.validation import query_pairs
from tests.perf.load import Workload, lua_script, parse_wrk

FRAGMENTS = (
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl",
    "EYJ",
    "xi-api-key: ",
    "XI_API_KEY=",
    '"xi-api-key": "',
    "api",
    "conversation_signature=",
    "Conversation_Signature=",
    "conver\u017fation_signature=",  # LATIN SMALL LETTER LONG S: (?i) folds it onto "s"
    "Bearer ",
    "bEaReR\t",
    "Basic ",
    "bAsIc\t",
    "dXNlcjpwYXNz",  # base64 of user:pass
    "\u017f\u017f\u017f\u017f",
    "sk_" + "0123456789abcdef" * 2,
    "\u212a",  # KELVIN SIGN: (?i) folds it onto "k"
    "é",
    " ",
    "&",
)


def slow_mask(text: str) -> str:
    """Mask the way mask_secrets did before its fast path: every pattern, always."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS) | st.text(string.printable, max_size=12), max_size=8).map("".join))
def test_mask_secrets_fast_path_masks_exactly_like_every_pattern(text: str) -> None:
    assert mask_secrets(text) == slow_mask(text)


def test_mask_secrets_still_masks_each_kind_of_secret() -> None:
    line = (
        "auth=Bearer abc.def xi-api-key=sk_live conversation_signature=s1g proxy=Basic dXNlcjpwYXNz "
        "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln key sk_" + "ab" * 16
    )
    masked = mask_secrets(line)
    for secret in ("abc.def", "sk_live", "s1g", "dXNlcjpwYXNz", "eyJhbGciOiJIUzI1NiJ9", "ab" * 16):
        assert secret not in masked
    assert mask_secrets("GET /v1/convai/conversations 200") == "GET /v1/convai/conversations 200"


def test_cached_metric_children_count_like_labels() -> None:
    metrics = Metrics()
    for status in (200, 200, 404):
        metrics.observe_request("get", "/v1/convai/conversations", status, 0.01)
    metrics.observe_upstream("list", "ok", 0.02)
    metrics.observe_rate_limit("user-history", "allowed")
    metrics.ledger_write("ok")
    metrics.ledger_write("ok")
    sample = metrics.registry.get_sample_value
    route = {"method": "GET", "route": "/v1/convai/conversations"}
    assert sample("convai_gateway_http_requests_total", {**route, "status": "200"}) == 2
    assert sample("convai_gateway_http_requests_total", {**route, "status": "404"}) == 1
    assert sample("convai_gateway_http_request_duration_seconds_count", route) == 3
    assert sample("convai_gateway_upstream_requests_total", {"endpoint": "list", "outcome": "ok"}) == 1
    assert (
        sample("convai_gateway_rate_limit_decisions_total", {"policy": "user-history", "outcome": "allowed"})
        == 1
    )
    assert sample("convai_gateway_ledger_writes_total", {"outcome": "ok"}) == 2
    # A second Metrics (own registry) never shares the first one's children.
    assert (
        Metrics().registry.get_sample_value("convai_gateway_ledger_writes_total", {"outcome": "ok"}) is None
    )


WRK_OUTPUT = """Running 5s test @ http://127.0.0.1:41000
  1 threads and 10 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.10ms  300.00us   9.00ms   90.00%
  Latency Distribution
     50%  850.00us
     75%    1.20ms
     90%    1.50ms
     99%    2.50ms
  4000 requests in 5.00s, 1.00MB read
  Non-2xx or 3xx responses: 3
Requests/sec:    800.00
"""


def test_wrk_summary_is_parsed_into_a_measurement() -> None:
    measured = parse_wrk(WRK_OUTPUT)
    assert (measured.requests_per_second, measured.requests, measured.errors) == (800.0, 4000, 3)
    assert (measured.p50_ms, measured.p99_ms) == (0.85, 2.5)


def test_lua_script_carries_method_headers_and_body() -> None:
    workload = Workload("feedback", "POST", "/v1/x", {"Authorization": 'Bearer "t"'}, '{"feedback":"like"}')
    script = lua_script([workload])
    assert (
        'wrk.format("POST", "/v1/x", {["Authorization"] = "Bearer \\"t\\""}, "{\\"feedback\\":\\"like\\"}")'
        in script
    )
    assert "thread:stop" not in script


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.sampled_from(["a", "=", "&", "%", "+", "%2B", "%3D", "%26", "%FF", "é", " ", "conversation_id"])
    )
)
def test_query_pairs_split_exactly_like_parse_qsl(parts: list[str]) -> None:
    query = "".join(parts)
    assert query_pairs(query) == parse_qsl(query, keep_blank_values=True)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


def _holds_float(value: object) -> bool:
    if isinstance(value, dict):
        return any(_holds_float(item) for item in value.values())
    if isinstance(value, list):
        return any(_holds_float(item) for item in value)
    return isinstance(value, float)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_json_answers_render_like_starlette(content: object) -> None:
    # orjson writes a small float's exponent without a leading zero (1e-5, not 1e-05): the same number.
    ours, starlettes = bytes(JsonAnswer(content).body), bytes(JSONResponse(content).body)
    assert json.loads(ours) == json.loads(starlettes)
    if not _holds_float(content):
        assert ours == starlettes


def _nested(depth: int) -> list[object]:
    value: list[object] = []
    for _ in range(depth):
        value = [value]
    return value


class Name(str):
    pass


@pytest.mark.parametrize(
    "content",
    [
        {"big": 2**64, "small": -(2**63) - 1},  # beyond 64 bits
        {"name": Name("subclass")},
        {1: "a key that is not a string"},
        {"text": "a lone surrogate \ud800"},
        {"deep": _nested(300)},
    ],
    ids=["big-int", "str-subclass", "int-key", "surrogate", "deep"],
)
def test_json_answers_orjson_leaves_out_render_exactly_like_starlette(content: object) -> None:
    with pytest.raises(NotPlainJson):
        plain_json(content)
    assert _rendered(JsonAnswer, content) == _rendered(JSONResponse, content)


def _rendered(response_class: type[JSONResponse], content: object) -> bytes | type[Exception]:
    try:
        return bytes(response_class(content).body)
    except Exception as exc:  # a lone surrogate cannot be UTF-8: both raise the same error
        return type(exc)

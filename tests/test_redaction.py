"""Redaction of conversation details: every secret path of the upstream schema, at any depth, any shape."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from service.redaction import redact

SECRET = "S3CR3T"
KEEP = "K33P"
_MARKER = re.compile(rf"(?:{SECRET}|{KEEP})-\d+")

keep = st.integers(0, 10**9).map(lambda n: f"{KEEP}-{n}")
secret = st.integers(0, 10**9).map(lambda n: f"{SECRET}-{n}")
Draw = Any


def markers(value: Any, kind: str) -> set[str]:
    """Return the markers of one kind found anywhere in `value` (keys included)."""
    return {m for m in _MARKER.findall(json.dumps(value)) if m.startswith(kind)}


def maybe(draw: Draw, target: dict[str, Any], key: str, strategy: st.SearchStrategy[Any]) -> None:
    """Set `target[key]` from `strategy` half of the time (optional schema fields)."""
    if draw(st.booleans()):
        target[key] = draw(strategy)


# A secret sometimes arrives in the documented type and sometimes in a wrong one: redaction must not care.
def secret_in_any_shape() -> st.SearchStrategy[Any]:
    """Return a strategy for a secret alone, in a list, in a mapping, or None."""
    return st.one_of(
        st.dictionaries(st.sampled_from(["Authorization", "X-Api-Key", "token", "id"]), secret, max_size=3),
        secret,
        st.lists(secret, max_size=2),
        st.just(None),
    )


@st.composite
def webhook_details(draw: Draw, *, typed: bool = True) -> dict[str, Any]:
    """Draw a webhook tool call's details with secrets in its URL, headers, query, path and body."""
    details: dict[str, Any] = {"method": draw(st.sampled_from(["GET", "POST"]))}
    if typed:
        details["type"] = "webhook"
    path = draw(keep)
    url = f"https://hooks.example.com/{path}"
    if draw(st.booleans()):
        url = f"https://svc:{draw(secret)}@hooks.example.com/{path}"
    if draw(st.booleans()):
        url += f"?api_key={draw(secret)}"
    if draw(st.booleans()):
        url += f"#{draw(secret)}"
    details["url"] = url
    for key in ("headers", "query_params", "path_params"):
        maybe(draw, details, key, secret_in_any_shape())
    maybe(draw, details, "body", st.one_of(secret, st.just(None), secret_in_any_shape()))
    return details


@st.composite
def client_details(draw: Draw) -> dict[str, Any]:
    """Draw a client tool call's details (nothing in them is redacted)."""
    return {"type": "client", "parameters": draw(keep)}


@st.composite
def mcp_details(draw: Draw) -> dict[str, Any]:
    """Draw an MCP tool call's details with secret parameters."""
    details = {
        "type": "mcp",
        "mcp_server_id": draw(keep),
        "mcp_server_name": draw(keep),
        "integration_type": draw(keep),
        "approval_policy": draw(keep),
        "requires_approval": draw(st.booleans()),
        "mcp_tool_name": draw(keep),
        "mcp_tool_description": draw(keep),
    }
    maybe(draw, details, "parameters", secret_in_any_shape())
    return details


@st.composite
def api_integration_details(draw: Draw) -> dict[str, Any]:
    """Draw an API-integration webhook tool call's details."""
    return {
        "type": "api_integration_webhook",
        "integration_id": draw(keep),
        "credential_id": draw(keep),
        "integration_connection_id": draw(keep),
        "webhook_details": draw(webhook_details(typed=draw(st.booleans()))),
    }


@st.composite
def tool_call(draw: Draw) -> dict[str, Any]:
    """Draw one tool call of a transcript entry, of any kind."""
    call: dict[str, Any] = {
        "request_id": draw(keep),
        "tool_name": draw(keep),
        "params_as_json": draw(keep),
        "tool_has_been_called": draw(st.booleans()),
    }
    maybe(draw, call, "type", st.sampled_from(["system", "webhook", "client", "mcp", "workflow", None]))
    call["tool_details"] = draw(
        st.one_of(
            webhook_details(typed=draw(st.booleans())),
            client_details(),
            mcp_details(),
            api_integration_details(),
            st.just(None),
        )
    )
    return call


@st.composite
def dynamic_variable_update(draw: Draw) -> dict[str, Any]:
    """Draw a dynamic-variable update, sometimes of a `secret__` variable."""
    # A secret variable's update goes as a whole, so its other fields carry no keep-markers.
    if draw(st.booleans()):
        name = draw(st.sampled_from(["secret__token", "SECRET__pin", "Secret__x"]))
        value, other = secret, st.just("t")
    else:
        name = draw(st.sampled_from(["city", "secretary", "my_secret__x", "secret_x"]))
        value, other = keep, keep
    return {
        "variable_name": name,
        "old_value": draw(st.one_of(value, st.just(None))),
        "new_value": draw(value),
        "updated_at": 1.5,
        "tool_name": draw(other),
        "tool_request_id": draw(other),
    }


def tool_result(depth: int) -> st.SearchStrategy[dict[str, Any]]:
    """Return a strategy for a tool result nested up to `depth` levels."""

    @st.composite
    def build(draw: Draw) -> dict[str, Any]:
        kind = draw(
            st.sampled_from(["webhook", "client", "mcp", "system", "api_integration_webhook", "workflow"])
        )
        result: dict[str, Any] = {
            "request_id": draw(keep),
            "tool_name": draw(keep),
            "result_value": draw(keep),
            "is_error": draw(st.booleans()),
            "tool_has_been_called": True,
            "tool_latency_secs": 0.25,
            "type": kind,
        }
        maybe(draw, result, "dynamic_variable_updates", st.lists(dynamic_variable_update(), max_size=3))
        if kind == "system":
            result["result"] = {"result_type": "end_call_success", "status": "success", "reason": draw(keep)}
        elif kind == "api_integration_webhook":
            result.update(
                integration_id=draw(keep), credential_id=draw(keep), integration_connection_id=draw(keep)
            )
        elif kind == "workflow":
            steps: list[dict[str, Any]] = [
                {
                    "type": "edge",
                    "step_latency_secs": 0.1,
                    "edge_id": draw(keep),
                    "target_node_id": draw(keep),
                },
                {"type": "max_iterations_exceeded", "step_latency_secs": 0.1, "max_iterations": 3},
            ]
            nested = st.lists(tool_result(depth - 1), max_size=2) if depth > 0 else st.just([])
            steps.append(
                {
                    "type": "nested_tools",
                    "step_latency_secs": 0.1,
                    "node_id": draw(keep),
                    "requests": draw(st.lists(tool_call(), max_size=2)),
                    "results": draw(nested),
                    "is_successful": True,
                }
            )
            result["result"] = draw(st.one_of(st.just({"steps": steps}), st.just(None)))
        return result

    return build()


@st.composite
def transcript_entry(draw: Draw) -> dict[str, Any]:
    """Draw one transcript entry with optional tool calls, results and metadata."""
    entry: dict[str, Any] = {"role": draw(st.sampled_from(["user", "agent"])), "time_in_call_secs": 3}
    maybe(draw, entry, "message", keep)
    maybe(draw, entry, "agent_metadata", st.fixed_dictionaries({"agent_id": keep, "workflow_node_id": keep}))
    maybe(draw, entry, "tool_calls", st.lists(tool_call(), max_size=3))
    maybe(draw, entry, "tool_results", st.lists(tool_result(2), max_size=3))
    maybe(draw, entry, "feedback", st.just({"score": "like", "time_in_call_secs": 2}))
    maybe(draw, entry, "original_message", keep)
    maybe(
        draw,
        entry,
        "rag_retrieval_info",
        st.fixed_dictionaries({"retrieval_query": keep, "chunks": st.just([])}),
    )
    return entry


@st.composite
def conversation(draw: Draw) -> dict[str, Any]:
    """Draw a whole conversation's details in the upstream schema."""
    metadata: dict[str, Any] = {
        "start_time_unix_secs": 1_700_000_000,
        "call_duration_secs": 42,
        "termination_reason": draw(keep),
        "phone_call": {
            "type": "twilio",
            "direction": "inbound",
            "call_sid": draw(keep),
            "agent_number": draw(keep),
        },
        "feedback": {"overall_score": "like", "likes": 1, "dislikes": 0, "comment": draw(keep)},
    }
    maybe(draw, metadata, "cost", st.one_of(st.integers(0, 10**6), secret))
    maybe(
        draw,
        metadata,
        "charging",
        st.fixed_dictionaries(
            {
                "tier": secret,
                "llm_price": st.just(0.02),
                "llm_usage": st.fixed_dictionaries({"model": secret}),
            }
        ),
    )
    dynamic = draw(
        st.dictionaries(
            st.sampled_from(["secret__api_key", "SECRET__PIN", "secret__"]), st.one_of(secret, st.just(None))
        )
    )
    dynamic.update(draw(st.dictionaries(st.sampled_from(["user_name", "city", "secret_santa"]), keep)))
    return {
        "agent_id": "agent_demo",
        "conversation_id": "conv_1",
        "status": "done",
        "user_id": draw(keep),
        "transcript": draw(st.lists(transcript_entry(), max_size=4)),
        "metadata": metadata,
        "analysis": {
            "call_successful": "success",
            "transcript_summary": draw(keep),
            "data_collection_results": {
                "city": {"data_collection_id": "city", "value": draw(keep), "rationale": draw(keep)}
            },
        },
        "conversation_initiation_client_data": {
            "user_id": draw(keep),
            "dynamic_variables": dynamic,
            "conversation_config_override": {"agent": {"first_message": draw(keep)}},
        },
        "has_audio": True,
        "has_user_audio": True,
        "has_response_audio": True,
    }


@settings(max_examples=300, deadline=None)
@given(conversation())
def test_redaction_removes_every_secret_and_keeps_everything_else(details: dict[str, Any]) -> None:
    original = copy.deepcopy(details)
    redacted = redact(details, ())
    assert markers(redacted, SECRET) == set()
    assert markers(redacted, KEEP) == markers(original, KEEP)
    assert details == original, "redact must not mutate its input"
    assert "charging" not in redacted["metadata"] and "cost" not in redacted["metadata"]
    assert redact(redacted, ()) == redacted


@settings(max_examples=200, deadline=None)
@given(conversation())
def test_redaction_strips_request_details_from_every_tool_details(details: dict[str, Any]) -> None:
    text = json.dumps(redact(details, ()))
    for key in ("headers", "query_params", "path_params", "body"):
        assert f'"{key}"' not in text
    assert '"secret__' not in text.lower()


SHAPE_KEYS = [
    "metadata", "charging", "cost", "tool_details", "webhook_details", "headers", "body", "url", "parameters",
    "type", "dynamic_variables", "dynamic_variable_updates", "variable_name", "tool_calls", "tool_results",
    "requests", "results", "transcript", "feedback", "x",
]  # fmt: skip
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(SHAPE_KEYS), children, max_size=5)
    ),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["metadata", "transcript", "x", "conversation_initiation_client_data"]), json_values
    )
)
def test_redaction_survives_any_shape(details: dict[str, Any]) -> None:
    original = copy.deepcopy(details)
    redacted = redact(details, ("transcript.*.feedback", "x.0", "metadata.*.y", "*"))
    assert isinstance(redacted, dict)
    assert details == original


def test_webhook_details_lose_headers_params_body_and_url_credentials() -> None:
    details = {
        "transcript": [
            {
                "role": "agent",
                "time_in_call_secs": 1,
                "tool_calls": [
                    {
                        "request_id": "r1",
                        "tool_name": "lookup",
                        "params_as_json": "{}",
                        "tool_has_been_called": True,
                        "tool_details": {
                            "type": "webhook",
                            "method": "POST",
                            "url": "https://user:pw@api.example.com/v1/orders?key=abc#frag",
                            "headers": {"Authorization": "Bearer xyz"},
                            "path_params": {"id": "1"},
                            "query_params": {"key": "abc"},
                            "body": '{"card": "4111"}',
                        },
                    }
                ],
            }
        ]
    }
    tool_details = redact(details, ())["transcript"][0]["tool_calls"][0]["tool_details"]
    assert tool_details == {"type": "webhook", "method": "POST", "url": "https://api.example.com/v1/orders"}


def test_client_tool_parameters_are_kept_and_mcp_parameters_removed() -> None:
    details = {
        "transcript": [
            {
                "tool_calls": [
                    {"tool_details": {"type": "client", "parameters": '{"a": 1}'}},
                    {"tool_details": {"type": "mcp", "mcp_server_id": "m", "parameters": {"token": "t"}}},
                ]
            }
        ]
    }
    calls = redact(details, ())["transcript"][0]["tool_calls"]
    assert calls[0]["tool_details"] == {"type": "client", "parameters": '{"a": 1}'}
    assert calls[1]["tool_details"] == {"type": "mcp", "mcp_server_id": "m"}


def test_secret_dynamic_variables_are_removed_wherever_they_appear() -> None:
    details = {
        "conversation_initiation_client_data": {
            "dynamic_variables": {"secret__key": "k", "Secret__Other": 1, "name": "Ada", "secretary": "Bo"}
        },
        "transcript": [
            {
                "tool_results": [
                    {
                        "dynamic_variable_updates": [
                            {"variable_name": "secret__key", "old_value": "a", "new_value": "b"},
                            {"variable_name": "city", "old_value": None, "new_value": "Oslo"},
                        ]
                    }
                ]
            }
        ],
    }
    redacted = redact(details, ())
    assert redacted["conversation_initiation_client_data"]["dynamic_variables"] == {
        "name": "Ada",
        "secretary": "Bo",
    }
    assert redacted["transcript"][0]["tool_results"][0]["dynamic_variable_updates"] == [
        {"variable_name": "city", "old_value": None, "new_value": "Oslo"}
    ]


def test_metadata_charging_and_cost_are_removed() -> None:
    redacted = redact({"metadata": {"cost": 12, "charging": {"tier": "pro"}, "call_duration_secs": 3}}, ())
    assert redacted == {"metadata": {"call_duration_secs": 3}}


def test_extra_paths_remove_dotted_paths_with_wildcards_and_ignore_absent_ones() -> None:
    details: dict[str, Any] = {
        "transcript": [{"message": "hi", "feedback": {"score": "like"}}, {"message": "yo"}, "not-a-dict"],
        "analysis": {"data_collection_results": {"a": {"value": 1, "rationale": "r"}, "b": {"value": 2}}},
        "metadata": {"phone_call": {"call_sid": "CA1"}, "main_language": "en"},
        "list": [1, 2, 3],
    }
    redacted = redact(
        details,
        (
            "transcript.*.feedback",
            "analysis.data_collection_results.*.value",
            "metadata.phone_call",
            "list.1",
            "missing.path",
            "metadata.main_language.deeper",
            "list.99",
        ),
    )
    assert redacted == {
        "transcript": [{"message": "hi"}, {"message": "yo"}, "not-a-dict"],
        "analysis": {"data_collection_results": {"a": {"rationale": "r"}, "b": {}}},
        "metadata": {"main_language": "en"},
        "list": [1, 3],
    }
    assert details["transcript"][0]["feedback"] == {"score": "like"}


def test_extra_paths_name_list_items_by_their_upstream_index() -> None:
    details: dict[str, Any] = {
        "transcript": [{"message": "keep-0"}, {"message": "SECRET-1"}, {"message": "keep-2"}],
        "tags": ["SECRET-a", "SECRET-b", "public"],
    }
    redacted = redact(details, ("transcript.1", "transcript.0", "tags.0", "tags.1", "tags.1.deeper"))
    assert redacted == {"transcript": [{"message": "keep-2"}], "tags": ["public"]}


@settings(max_examples=200, deadline=None)
@given(items=st.lists(st.text(alphabet="xyz", max_size=3), max_size=6), data=st.data())
def test_any_set_of_list_indexes_removes_exactly_those_items(items: list[str], data: st.DataObject) -> None:
    named = data.draw(st.lists(st.integers(0, 7), max_size=6))
    redacted = redact({"items": list(items)}, tuple(f"items.{index}" for index in named))
    assert redacted == {"items": [item for index, item in enumerate(items) if index not in named]}


# REDACT_FIELDS: whatever document and whichever path an operator names (wildcards included), the value at
# that path never comes out. Added with the reliability suite (issue 9).
junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet="xyz", max_size=4),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.sampled_from("xyz"), children, max_size=3)
    ),
    max_leaves=10,
)


@st.composite
def document_with_secret_at_a_path(draw: Draw) -> tuple[dict[str, Any], str, str]:
    """Draw a document holding a secret marker at a random path, and a dotted path (maybe wildcarded) to it."""
    marker = draw(secret)
    depth = draw(st.integers(1, 5))
    segments: list[str | int] = [draw(st.sampled_from("abc"))]
    for _ in range(depth - 1):
        segments.append(draw(st.one_of(st.sampled_from("abc"), st.integers(0, 3))))
    value: Any = marker
    for segment in reversed(segments):
        if isinstance(segment, int):
            items = draw(st.lists(junk, min_size=segment + 1, max_size=segment + 3))
            items[segment] = value
            value = items
        else:
            siblings = draw(st.dictionaries(st.sampled_from("abcxyz"), junk, max_size=3))
            siblings[segment] = value
            value = siblings
    dotted = ".".join("*" if draw(st.booleans()) and i else str(s) for i, s in enumerate(segments))
    return value, dotted, marker


@settings(max_examples=300, deadline=None)
@given(document_with_secret_at_a_path())
def test_redact_fields_never_let_the_named_path_through(case: tuple[dict[str, Any], str, str]) -> None:
    details, dotted, marker = case
    original = copy.deepcopy(details)
    assert marker in json.dumps(details)
    redacted = redact(details, (dotted,))
    assert marker not in json.dumps(redacted), dotted
    assert details == original, "redact must not mutate its input"

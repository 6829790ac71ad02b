"""Realistic conversation data, deterministic audio bytes and the seed set for the upstream emulator."""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import string
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from service.emulator.model import EVALUATION_RESULTS, FEEDBACK_SCORES, STATUSES, Conversation

ID_ALPHABET = string.digits + string.ascii_lowercase
DEFAULT_AUDIO_SIZE = 32 * 1024
AUDIO_CHUNK_SIZE = 64 * 1024
# An ID3v2.4 tag header with an empty tag, then an MPEG-1 Layer III frame header (128 kbit/s, 44.1 kHz).
AUDIO_HEADER = b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x64"

# Fake credentials planted in every sample transcript so redaction tests can assert they never leak.
FAKE_WEBHOOK_BEARER = "Bearer sk-emu-webhook-7f3a9c1e5b2d4f6a8c0e"
FAKE_WEBHOOK_API_KEY = "whk-emu-2b6d8e0f3a5c7b9d"
FAKE_QUERY_TOKEN = "qtok-emu-5c7b9d1e2f4a6c8e"  # noqa: S105 - fake
FAKE_BODY_SECRET = "card-emu-4111111111111111"  # noqa: S105 - fake
FAKE_MCP_TOKEN = "mcp-emu-token-9d1e2f4a6c8e0a2c"  # noqa: S105 - fake
FAKE_INTEGRATION_BEARER = "Bearer sk-emu-integration-3a5c7b9d1e2f"
FAKE_DYNAMIC_SECRET = "crm-emu-secret-0f3a5c7b9d1e"  # noqa: S105 - fake
FAKE_SECRETS = (
    FAKE_WEBHOOK_BEARER.removeprefix("Bearer "),
    FAKE_WEBHOOK_API_KEY,
    FAKE_QUERY_TOKEN,
    FAKE_BODY_SECRET,
    FAKE_MCP_TOKEN,
    FAKE_INTEGRATION_BEARER.removeprefix("Bearer "),
    FAKE_DYNAMIC_SECRET,
)

SPEC_KEYS = frozenset(
    {
        "conversation_id", "agent_id", "agent_name", "user_id", "start_time_unix_secs", "call_duration_secs",
        "status", "call_successful", "rating", "has_feedback_comment", "feedback_comment", "feedback",
        "transcript_summary", "call_summary_title", "tool_names", "evaluations", "data_collection",
        "audio_size_bytes", "transcript", "dynamic_variables",
    }
)  # fmt: skip


def new_conversation_id(rng: random.Random | None = None) -> str:
    """Return a fresh id shaped like upstream's: `conv_` plus 26 characters of [0-9a-z]."""
    if rng is None:
        return "conv_" + "".join(secrets.choice(ID_ALPHABET) for _ in range(26))
    return "conv_" + "".join(rng.choice(ID_ALPHABET) for _ in range(26))


def audio_chunks(conversation_id: str, size: int, chunk_size: int = AUDIO_CHUNK_SIZE) -> Iterator[bytes]:
    """Yield `size` deterministic MP3-looking bytes for a conversation, one chunk at a time."""
    # One pseudo-random block per conversation, repeated, so any size costs one block of memory.
    block = random.Random(hashlib.sha256(conversation_id.encode()).digest()).randbytes(chunk_size)  # noqa: S311
    first = AUDIO_HEADER + block[len(AUDIO_HEADER) :]
    offset = 0
    while offset < size:
        n = min(chunk_size, size - offset)
        yield (first if offset == 0 else block)[:n]
        offset += n


def audio_bytes(conversation_id: str, size: int) -> bytes:
    """Return the whole audio body the emulator serves for a conversation (for test assertions)."""
    return b"".join(audio_chunks(conversation_id, size))


def _request_id(rng: random.Random) -> str:
    return "toolu_" + "".join(rng.choice(ID_ALPHABET) for _ in range(20))


def _tool_turn(name: str, user_name: str, at: int, rng: random.Random) -> dict[str, Any]:
    """Return an agent turn that calls tool `name` and reports its result, shaped by the tool's kind."""
    request_id = _request_id(rng)
    params: dict[str, Any]
    details: dict[str, Any] | None
    result: dict[str, Any]
    tool_type: str
    message: str
    if name == "search_knowledge_base":
        tool_type = "mcp"
        params = {"query": "return policy"}
        details = {
            "type": "mcp",
            "mcp_server_id": "mcp_srv_7kq2m4x9",
            "mcp_server_name": "Help Center",
            "integration_type": "mcp_server",
            "parameters": {"query": "return policy", "access_token": FAKE_MCP_TOKEN},
            "approval_policy": "auto_approve_all",
            "requires_approval": False,
            "mcp_tool_name": "search",
            "mcp_tool_description": "Search the help center articles.",
        }
        result = {"type": "mcp", "result_value": '{"articles": ["Returns within 30 days"]}'}
        message = "Returns are accepted within 30 days of delivery, free of charge."
    elif name == "create_calendar_event":
        tool_type = "api_integration_webhook"
        params = {"title": "Callback", "start": "2025-06-02T10:00:00Z"}
        details = {
            "type": "api_integration_webhook",
            "integration_id": "int_google_calendar",
            "credential_id": "cred_5h2k9q",
            "integration_connection_id": "conn_8d3j1w",
            "webhook_details": {
                "type": "webhook",
                "method": "POST",
                "url": "https://www.googleapis.com/calendar/v3/calendars/primary/events",
                "headers": {"Authorization": FAKE_INTEGRATION_BEARER},
                "path_params": {},
                "query_params": {"sendUpdates": "all"},
                "body": json.dumps({"summary": "Callback", "attendee": f"{user_name}@example.com"}),
            },
        }
        result = {
            "type": "api_integration_webhook",
            "result_value": '{"id": "evt_42", "status": "confirmed"}',
            "integration_id": "int_google_calendar",
            "credential_id": "cred_5h2k9q",
            "integration_connection_id": "conn_8d3j1w",
        }
        message = "I've booked a callback for Monday at ten."
    elif name == "show_product_card":
        tool_type = "client"
        params = {"sku": "SKU-1138"}
        details = {"type": "client", "parameters": json.dumps(params)}
        result = {"type": "client", "result_value": "displayed"}
        message = "I've put the product card on your screen."
    elif name == "end_call":
        tool_type = "system"
        params = {"reason": "The caller's questions were answered."}
        details = None
        result = {
            "type": "system",
            "result_value": '{"status": "success"}',
            "result": {
                "result_type": "end_call_success",
                "status": "success",
                "reason": "The caller's questions were answered.",
                "message": None,
            },
        }
        message = "You're welcome. Have a nice day!"
    else:
        tool_type = "webhook"
        params = {"order_id": "4417"}
        details = {
            "type": "webhook",
            "method": "POST",
            "url": "https://orders.example.com/api/v2/orders/{order_id}/" + name,
            "headers": {"Authorization": FAKE_WEBHOOK_BEARER, "X-Api-Key": FAKE_WEBHOOK_API_KEY},
            "path_params": {"order_id": "4417"},
            "query_params": {"include": "tracking", "api_token": FAKE_QUERY_TOKEN},
            "body": json.dumps(
                {"order_id": "4417", "email": f"{user_name}@example.com", "card": FAKE_BODY_SECRET}
            ),
        }
        result = {"type": "webhook", "result_value": '{"status": "shipped", "eta": "2025-06-03"}'}
        message = "Your order 4417 has shipped and should arrive on June 3rd."
    call = {
        "type": tool_type,
        "request_id": request_id,
        "tool_name": name,
        "params_as_json": json.dumps(params),
        "tool_has_been_called": True,
        "tool_details": details,
    }
    result = {
        "request_id": request_id,
        "tool_name": name,
        "is_error": False,
        "tool_has_been_called": True,
        "tool_latency_secs": round(0.2 + rng.random(), 3),
        "dynamic_variable_updates": [],
        **result,
    }
    return make_turn("agent", message, at, tool_calls=[call], tool_results=[result])


def make_turn(role: str, message: str | None, at: int, **extra: Any) -> dict[str, Any]:
    """Return a transcript turn with every field upstream sends, overridden by `extra`."""
    turn: dict[str, Any] = {
        "role": role,
        "agent_metadata": None,
        "message": message,
        "multivoice_message": None,
        "tool_calls": [],
        "tool_results": [],
        "feedback": None,
        "llm_override": None,
        "time_in_call_secs": at,
        "conversation_turn_metrics": None,
        "rag_retrieval_info": None,
        "llm_usage": None,
        "interrupted": False,
        "original_message": None,
        "source_medium": "audio",
    }
    turn.update(extra)
    return turn


def default_transcript(
    agent_id: str, user_name: str, tool_names: list[str], rng: random.Random
) -> list[dict[str, Any]]:
    """Return a plausible support call that calls each tool in `tool_names`."""
    greeting = f"Hi {user_name.title()}, thanks for calling Demo Support. How can I help?"
    turns = [
        make_turn("agent", greeting, 0),
        make_turn("user", "Hi, where is my order 4417? And what is the return policy?", 4),
    ]
    at = 6
    for name in tool_names:
        turn = _tool_turn(name, user_name, at, rng)
        turn["conversation_turn_metrics"] = {"metrics": {"convai_llm_service_ttfb": {"elapsed_time": 0.41}}}
        if name == "search_knowledge_base":
            turn["rag_retrieval_info"] = {
                "chunks": [{"document_id": "doc_returns", "chunk_id": "chunk_3", "vector_distance": 0.18}],
                "embedding_model": "e5_mistral_7b_instruct",
                "retrieval_query": "return policy",
                "rag_latency_secs": 0.12,
            }
        turns.append(turn)
        at += 5
    turns.append(make_turn("user", "Great, thanks for the help!", at))
    turns.append(make_turn("agent", "Glad I could help. Goodbye!", at + 2))
    for turn in turns:
        if turn["role"] == "agent":
            turn["agent_metadata"] = {"agent_id": agent_id, "branch_id": None, "workflow_node_id": None}
    return turns


def _normalise_transcript(entries: Any, agent_id: str) -> list[dict[str, Any]]:
    if not isinstance(entries, list):
        raise ValueError("transcript must be a list of {role, message} objects")
    turns = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("role") not in ("user", "agent"):
            raise ValueError(f"transcript[{index}] needs role 'user' or 'agent'")
        turn = make_turn(entry["role"], entry.get("message"), int(entry.get("time_in_call_secs", index * 3)))
        if entry["role"] == "agent":
            turn["agent_metadata"] = {"agent_id": agent_id, "branch_id": None, "workflow_node_id": None}
        turn.update(entry)
        turns.append(turn)
    return turns


def _expect(spec: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = spec.get(key, default)
    if value is default:
        return value
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ValueError(f"{key} has the wrong type")
    if not isinstance(value, kind):
        raise ValueError(f"{key} has the wrong type")
    return value


def build_conversation(
    spec: Mapping[str, Any], *, now: float, new_id: Callable[[], str], rng: random.Random | None = None
) -> Conversation:
    """Build a Conversation from a seeding spec, filling realistic defaults; raise ValueError when invalid."""
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise ValueError(f"unknown fields: {', '.join(unknown)}")
    rng = rng or random.Random(secrets.randbits(64))  # noqa: S311 - sample data, not security
    agent_id = _expect(spec, "agent_id", str, "agent_demo")
    user_id = _expect(spec, "user_id", (str, type(None)), None)
    status = _expect(spec, "status", str, "done")
    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}")
    call_successful = _expect(spec, "call_successful", str, "success")
    if call_successful not in EVALUATION_RESULTS:
        raise ValueError(f"call_successful must be one of {', '.join(EVALUATION_RESULTS)}")
    rating = _expect(spec, "rating", (int, type(None)), None)
    feedback = _expect(spec, "feedback", (str, type(None)), None)
    if feedback is not None and feedback not in FEEDBACK_SCORES:
        raise ValueError("feedback must be 'like', 'dislike' or null")
    comment = _expect(spec, "feedback_comment", (str, type(None)), None)
    if comment is None and _expect(spec, "has_feedback_comment", bool, False):
        comment = "The agent was quick and friendly."
    tool_names = _expect(spec, "tool_names", list, None)
    if tool_names is not None and not all(isinstance(name, str) for name in tool_names):
        raise ValueError("tool_names must be a list of strings")
    evaluations = _expect(spec, "evaluations", dict, {})
    for criteria_id, result in evaluations.items():
        if result not in EVALUATION_RESULTS:
            raise ValueError(f"evaluations[{criteria_id}] must be one of {', '.join(EVALUATION_RESULTS)}")
    audio_size = _expect(spec, "audio_size_bytes", int, DEFAULT_AUDIO_SIZE)
    if audio_size < 0:
        raise ValueError("audio_size_bytes must be >= 0")
    user_name = user_id or "caller"
    if "transcript" in spec:
        transcript = _normalise_transcript(spec["transcript"], agent_id)
        extra_tools = list(tool_names or [])
    else:
        used = ["get_order_status", "search_knowledge_base", "end_call"] if tool_names is None else tool_names
        transcript = default_transcript(agent_id, user_name, used, rng)
        extra_tools = []
    conversation_id = _expect(spec, "conversation_id", str, None) or new_id()
    return Conversation(
        conversation_id=conversation_id,
        agent_id=agent_id,
        agent_name=_expect(spec, "agent_name", (str, type(None)), "Demo Support Agent"),
        user_id=user_id,
        start_time_unix_secs=_expect(spec, "start_time_unix_secs", int, int(now)),
        call_duration_secs=_expect(spec, "call_duration_secs", int, 30 + 5 * len(transcript)),
        status=status,
        call_successful=call_successful,
        transcript_summary=_expect(
            spec,
            "transcript_summary",
            str,
            f"The caller {user_name} asked about an order and the return policy; the agent answered both.",
        ),
        call_summary_title=_expect(spec, "call_summary_title", (str, type(None)), "Order status and returns"),
        rating=rating,
        feedback_comment=comment,
        feedback_score=feedback,
        evaluations=dict(evaluations),
        data_collection=dict(_expect(spec, "data_collection", dict, {})),
        transcript=transcript,
        dynamic_variables={
            "customer_name": user_name.title(),
            "plan": "pro",
            "secret__crm_token": FAKE_DYNAMIC_SECRET,
            **_expect(spec, "dynamic_variables", dict, {}),
        },
        audio_size_bytes=audio_size,
        extra_tool_names=extra_tools,
    )


def seed_specs(now: float) -> list[dict[str, Any]]:
    """Return the sample conversations `make dev` starts with: agent_demo, users alice and bob."""
    hour = 3600
    start = int(now)
    return [
        {
            "conversation_id": "conv_01alice0order0status00000a",
            "user_id": "alice",
            "start_time_unix_secs": start - 2 * hour,
            "call_duration_secs": 94,
            "rating": 5,
            "feedback": "like",
            "has_feedback_comment": True,
            "evaluations": {"resolved_issue": "success", "polite_tone": "success"},
            "data_collection": {"order_id": "4417", "satisfaction": 5, "wants_callback": False},
        },
        {
            "conversation_id": "conv_02alice0callback000000000a",
            "user_id": "alice",
            "start_time_unix_secs": start - 26 * hour,
            "call_duration_secs": 61,
            "rating": 3,
            "tool_names": ["create_calendar_event", "show_product_card", "end_call"],
            "call_successful": "unknown",
            "transcript_summary": "Alice asked for a callback about a product; the agent booked one.",
            "call_summary_title": "Callback booked",
            "evaluations": {"resolved_issue": "unknown", "polite_tone": "success"},
            "data_collection": {"order_id": "5120", "satisfaction": 3, "wants_callback": True},
            "audio_size_bytes": 48 * 1024,
        },
        {
            "conversation_id": "conv_03bob00refund000000000000b",
            "user_id": "bob",
            "start_time_unix_secs": start - 5 * hour,
            "call_duration_secs": 182,
            "rating": 2,
            "feedback": "dislike",
            "call_successful": "failure",
            "transcript_summary": "Bob asked for a refund outside the return window; the agent could not help.",
            "call_summary_title": "Refund refused",
            "evaluations": {"resolved_issue": "failure", "polite_tone": "success"},
            "data_collection": {"order_id": "3981", "satisfaction": 1, "wants_callback": True},
        },
        {
            "conversation_id": "conv_04bob00inprogress00000000b",
            "user_id": "bob",
            "start_time_unix_secs": start - 60,
            "call_duration_secs": 12,
            "status": "in-progress",
            "call_successful": "unknown",
            "tool_names": [],
            "transcript_summary": "",
            "call_summary_title": None,
        },
    ]

"""List endpoint: every filter, summary mode, cursor pagination and FastAPI-style 422s."""

from __future__ import annotations

import re

import httpx
import pytest
from starlette.applications import Starlette

from service.emulator import create_emulator_app
from tests.emulator.conftest import API_KEY, AUTH, create

LIST = "/v1/convai/conversations"


@pytest.fixture
async def three(client: httpx.AsyncClient) -> None:
    """Create conversations A (alice, a1), B (bob, a1) and C (alice, a2) with distinct filterable fields."""
    await create(
        client,
        conversation_id="conv_a",
        user_id="alice",
        agent_id="a1",
        start_time_unix_secs=1000,
        call_duration_secs=60,
        rating=5,
        call_successful="success",
        has_feedback_comment=True,
        tool_names=["get_order_status"],
        evaluations={"resolved": "success"},
        data_collection={"order_id": "4417", "satisfaction": 5, "vip": True},
        transcript=[
            {"role": "user", "message": "Where is my parcel?"},
            {"role": "agent", "message": "On its way."},
        ],
    )
    await create(
        client,
        conversation_id="conv_b",
        user_id="bob",
        agent_id="a1",
        start_time_unix_secs=2000,
        call_duration_secs=120,
        rating=2,
        call_successful="failure",
        tool_names=["search_knowledge_base"],
        evaluations={"resolved": "failure"},
        data_collection={"order_id": "5120", "satisfaction": 1},
        transcript=[{"role": "user", "message": "I want a refund."}],
    )
    await create(
        client,
        conversation_id="conv_c",
        user_id="alice",
        agent_id="a2",
        start_time_unix_secs=3000,
        call_duration_secs=30,
        call_successful="unknown",
        tool_names=[],
        transcript=[{"role": "user", "message": "Hello there"}],
    )


async def ids(client: httpx.AsyncClient, params: list[tuple[str, str]]) -> list[str]:
    """Return the conversation ids the list endpoint answers for `params`."""
    response = await client.get(LIST, params=tuple(params), headers=AUTH)
    assert response.status_code == 200, response.text
    return [row["conversation_id"] for row in response.json()["conversations"]]


@pytest.mark.usefixtures("three")
@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ([], ["conv_c", "conv_b", "conv_a"]),
        ([("user_id", "alice")], ["conv_c", "conv_a"]),
        ([("agent_id", "a1")], ["conv_b", "conv_a"]),
        ([("user_id", "alice"), ("agent_id", "a1")], ["conv_a"]),
        ([("call_start_before_unix", "2000")], ["conv_a"]),
        ([("call_start_after_unix", "2000")], ["conv_c"]),
        ([("call_duration_min_secs", "60")], ["conv_b", "conv_a"]),
        ([("call_duration_max_secs", "60")], ["conv_c", "conv_a"]),
        ([("rating_min", "3")], ["conv_a"]),
        ([("rating_max", "3")], ["conv_b"]),
        ([("call_successful", "failure")], ["conv_b"]),
        ([("has_feedback_comment", "true")], ["conv_a"]),
        ([("has_feedback_comment", "false")], ["conv_c", "conv_b"]),
        ([("tool_names", "search_knowledge_base")], ["conv_b"]),
        ([("tool_names", "get_order_status"), ("tool_names", "search_knowledge_base")], ["conv_b", "conv_a"]),
        ([("evaluation_params", "resolved:success")], ["conv_a"]),
        ([("evaluation_params", "resolved:failure"), ("evaluation_params", "other:success")], []),
        ([("data_collection_params", "order_id:eq:4417")], ["conv_a"]),
        ([("data_collection_params", "order_id:neq:4417")], ["conv_b"]),
        ([("data_collection_params", "satisfaction:gt:1")], ["conv_a"]),
        ([("data_collection_params", "satisfaction:gte:1")], ["conv_b", "conv_a"]),
        ([("data_collection_params", "satisfaction:lt:5")], ["conv_b"]),
        ([("data_collection_params", "satisfaction:lte:5")], ["conv_b", "conv_a"]),
        ([("data_collection_params", "order_id:in:4417|5120")], ["conv_b", "conv_a"]),
        ([("data_collection_params", "vip:exists")], ["conv_a"]),
        ([("data_collection_params", "vip:missing")], ["conv_c", "conv_b"]),
        ([("data_collection_params", "vip:eq:true")], ["conv_a"]),
        ([("data_collection_params", "order_id:eq:")], ["conv_c"]),
        (
            [("data_collection_params", "order_id:exists"), ("data_collection_params", "satisfaction:lt:3")],
            ["conv_b"],
        ),
        ([("search", "REFUND")], ["conv_b"]),
        ([("search", "nothing like this")], []),
    ],
)
async def test_list_filters_select_matching_conversations_newest_first(
    client: httpx.AsyncClient, params: list[tuple[str, str]], expected: list[str]
) -> None:
    assert await ids(client, params) == expected


@pytest.mark.usefixtures("three")
async def test_summary_mode_include_adds_transcript_summary_only_when_asked(
    client: httpx.AsyncClient,
) -> None:
    default = (await client.get(LIST, headers=AUTH)).json()["conversations"][0]
    excluded = (await client.get(LIST, params={"summary_mode": "exclude"}, headers=AUTH)).json()[
        "conversations"
    ][0]
    included = (await client.get(LIST, params={"summary_mode": "include"}, headers=AUTH)).json()[
        "conversations"
    ][0]
    assert "transcript_summary" not in default
    assert "transcript_summary" not in excluded
    assert isinstance(included["transcript_summary"], str) and included["transcript_summary"]


@pytest.mark.usefixtures("three")
async def test_rows_have_the_summary_model_fields(client: httpx.AsyncClient) -> None:
    body = (await client.get(LIST, params={"user_id": "alice", "agent_id": "a1"}, headers=AUTH)).json()
    assert body["has_more"] is False and body["next_cursor"] is None
    row = body["conversations"][0]
    assert row == {
        "agent_id": "a1",
        "branch_id": None,
        "agent_name": "Demo Support Agent",
        "conversation_id": "conv_a",
        "start_time_unix_secs": 1000,
        "call_duration_secs": 60,
        "message_count": 2,
        "status": "done",
        "call_successful": "success",
        "call_summary_title": "Order status and returns",
        "direction": None,
        "rating": 5.0,
    }


async def test_cursor_pagination_walks_every_conversation_once(client: httpx.AsyncClient) -> None:
    for n in range(7):
        await create(client, conversation_id=f"conv_p{n}", start_time_unix_secs=1000 + n, tool_names=[])
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params = {"page_size": "3", **({"cursor": cursor} if cursor else {})}
        body = (await client.get(LIST, params=params, headers=AUTH)).json()
        pages += 1
        seen += [row["conversation_id"] for row in body["conversations"]]
        if not body["has_more"]:
            assert body["next_cursor"] is None
            break
        assert len(body["conversations"]) == 3
        cursor = body["next_cursor"]
    assert pages == 3
    assert seen == [f"conv_p{n}" for n in reversed(range(7))]


async def test_cursor_survives_deleting_the_last_row_of_the_page(client: httpx.AsyncClient) -> None:
    for n in range(4):
        await create(client, conversation_id=f"conv_d{n}", start_time_unix_secs=1000 + n, tool_names=[])
    first = (await client.get(LIST, params={"page_size": "2"}, headers=AUTH)).json()
    await client.delete("/v1/convai/conversations/conv_d2", headers=AUTH)
    rest = (
        await client.get(LIST, params={"page_size": "2", "cursor": first["next_cursor"]}, headers=AUTH)
    ).json()
    assert [row["conversation_id"] for row in rest["conversations"]] == ["conv_d1", "conv_d0"]


async def test_page_size_defaults_to_30(client: httpx.AsyncClient) -> None:
    for n in range(31):
        await create(client, start_time_unix_secs=1000 + n, tool_names=[])
    body = (await client.get(LIST, headers=AUTH)).json()
    assert len(body["conversations"]) == 30
    assert body["has_more"] is True
    body = (await client.get(LIST, params={"page_size": "100"}, headers=AUTH)).json()
    assert len(body["conversations"]) == 31 and body["has_more"] is False


@pytest.mark.parametrize(
    ("params", "loc", "error_type"),
    [
        ({"page_size": "0"}, ["query", "page_size"], "greater_than_equal"),
        ({"page_size": "101"}, ["query", "page_size"], "less_than_equal"),
        ({"page_size": "ten"}, ["query", "page_size"], "int_parsing"),
        ({"call_start_before_unix": "yesterday"}, ["query", "call_start_before_unix"], "int_parsing"),
        ({"rating_min": "4.5"}, ["query", "rating_min"], "int_parsing"),
        ({"call_successful": "maybe"}, ["query", "call_successful"], "enum"),
        ({"summary_mode": "all"}, ["query", "summary_mode"], "enum"),
        ({"has_feedback_comment": "perhaps"}, ["query", "has_feedback_comment"], "bool_parsing"),
        ({"evaluation_params": "resolved"}, ["query", "evaluation_params", 0], "value_error"),
        ({"evaluation_params": "resolved:great"}, ["query", "evaluation_params", 0], "value_error"),
        (
            {"data_collection_params": "order_id:like:44"},
            ["query", "data_collection_params", 0],
            "value_error",
        ),
        (
            {"data_collection_params": "satisfaction:gt:high"},
            ["query", "data_collection_params", 0],
            "value_error",
        ),
        ({"cursor": "not-a-cursor"}, ["query", "cursor"], "value_error"),
    ],
)
async def test_invalid_list_parameters_get_a_fastapi_style_422(
    client: httpx.AsyncClient, params: dict[str, str], loc: list[str | int], error_type: str
) -> None:
    response = await client.get(LIST, params=params, headers=AUTH)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == loc
    assert error["type"] == error_type
    assert isinstance(error["msg"], str) and error["msg"]


async def test_every_invalid_parameter_is_reported_at_once(client: httpx.AsyncClient) -> None:
    response = await client.get(LIST, params={"page_size": "0", "summary_mode": "x"}, headers=AUTH)
    assert response.status_code == 422
    assert sorted(e["loc"][1] for e in response.json()["detail"]) == ["page_size", "summary_mode"]


async def test_seeded_app_starts_with_sample_conversations_for_alice_and_bob() -> None:
    app: Starlette = create_emulator_app(API_KEY)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://emulator.test"
    ) as http:
        rows = (await http.get(LIST, headers=AUTH)).json()["conversations"]
        alice = (await http.get(LIST, params={"user_id": "alice"}, headers=AUTH)).json()["conversations"]
    assert {row["agent_id"] for row in rows} == {"agent_demo"}
    assert len(alice) >= 2 and len(rows) > len(alice)
    assert all(re.fullmatch(r"conv_[0-9a-z]{26}", row["conversation_id"]) for row in rows)
    starts = [row["start_time_unix_secs"] for row in rows]
    assert starts == sorted(starts, reverse=True)

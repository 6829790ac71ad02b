"""The /_emulator/ control API: seeding, reset, config, fault queue and the request log."""

from __future__ import annotations

import httpx
import pytest

from tests.emulator.conftest import API_KEY, AUTH, create


async def test_created_conversation_uses_the_given_fields(client: httpx.AsyncClient) -> None:
    details = await create(
        client,
        conversation_id="conv_given",
        agent_id="agent_x",
        user_id="carol",
        start_time_unix_secs=1234,
        call_duration_secs=77,
        status="failed",
        call_successful="failure",
        rating=4,
        has_feedback_comment=True,
        transcript_summary="Carol called.",
        evaluations={"polite": "success"},
        data_collection={"plan": "pro"},
        audio_size_bytes=10,
        transcript=[{"role": "user", "message": "hi", "time_in_call_secs": 1}],
    )
    assert details["conversation_id"] == "conv_given"
    assert (details["agent_id"], details["user_id"], details["status"]) == ("agent_x", "carol", "failed")
    assert details["metadata"]["start_time_unix_secs"] == 1234
    assert details["metadata"]["call_duration_secs"] == 77
    assert details["metadata"]["feedback"]["rating"] == 4
    assert details["metadata"]["feedback"]["comment"]
    assert details["analysis"]["call_successful"] == "failure"
    assert details["analysis"]["transcript_summary"] == "Carol called."
    assert details["analysis"]["evaluation_criteria_results"]["polite"]["result"] == "success"
    assert details["analysis"]["data_collection_results"]["plan"]["value"] == "pro"
    assert [(t["role"], t["message"]) for t in details["transcript"]] == [("user", "hi")]


async def test_created_conversation_without_id_gets_an_upstream_shaped_one(client: httpx.AsyncClient) -> None:
    first = await create(client, user_id="alice")
    second = await create(client, user_id="alice")
    assert first["conversation_id"] != second["conversation_id"]
    assert first["conversation_id"].startswith("conv_") and len(first["conversation_id"]) == 31


@pytest.mark.parametrize(
    "spec",
    [
        {"colour": "blue"},
        {"status": "finished"},
        {"call_successful": "yes"},
        {"rating": "five"},
        {"feedback": "love"},
        {"evaluations": {"x": "great"}},
        {"tool_names": "search"},
        {"audio_size_bytes": -1},
        {"transcript": [{"role": "robot", "message": "hi"}]},
        [],
    ],
)
async def test_invalid_seeding_specs_are_rejected(client: httpx.AsyncClient, spec: object) -> None:
    response = await client.post("/_emulator/conversations", json=spec)
    assert response.status_code == 400
    assert isinstance(response.json()["detail"], str)


async def test_duplicate_conversation_id_is_a_conflict(client: httpx.AsyncClient) -> None:
    await create(client, conversation_id="conv_dup")
    response = await client.post("/_emulator/conversations", json={"conversation_id": "conv_dup"})
    assert response.status_code == 409


async def test_reset_clears_everything_and_can_reseed(client: httpx.AsyncClient) -> None:
    await create(client, conversation_id="conv_x")
    await client.post("/_emulator/faults", json={"kind": "status", "times": 5})
    await client.post(
        "/_emulator/config", json={"signed_url_id_in_body": True, "token_conversation_id": True}
    )
    await client.get("/v1/convai/conversation/token", params={"agent_id": "a"}, headers=AUTH)
    assert (await client.post("/_emulator/reset")).status_code == 200
    assert (await client.get("/_emulator/faults")).json() == []
    assert (await client.get("/_emulator/requests")).json() == []
    config = (await client.post("/_emulator/config", json={})).json()
    assert config == {"signed_url_id_in_body": False, "token_conversation_id": False}
    assert (await client.get("/v1/convai/conversations", headers=AUTH)).json()["conversations"] == []
    await client.post("/_emulator/reset", json={"seed": True})
    rows = (await client.get("/v1/convai/conversations", headers=AUTH)).json()["conversations"]
    assert {row["agent_id"] for row in rows} == {"agent_demo"} and len(rows) >= 3


async def test_request_log_records_what_upstream_received(client: httpx.AsyncClient) -> None:
    params = httpx.QueryParams([("user_id", "alice"), ("tool_names", "a"), ("tool_names", "b")])
    await client.get("/v1/convai/conversations", params=params, headers={**AUTH, "X-Request-ID": "req-1"})
    await client.post("/v1/convai/conversations/conv_x/feedback", json={"feedback": "like"}, headers=AUTH)
    await client.get("/_emulator/faults")
    log = (await client.get("/_emulator/requests")).json()
    assert [entry["endpoint"] for entry in log] == ["list", "feedback"]
    listed, feedback = log
    assert (listed["method"], listed["path"]) == ("GET", "/v1/convai/conversations")
    assert listed["query"] == [["user_id", "alice"], ["tool_names", "a"], ["tool_names", "b"]]
    assert listed["headers"]["xi-api-key"] == API_KEY
    assert listed["headers"]["x-request-id"] == "req-1"
    assert feedback["method"] == "POST" and '"like"' in feedback["body"]
    assert (await client.delete("/_emulator/requests")).status_code == 200
    assert (await client.get("/_emulator/requests")).json() == []


async def test_request_log_is_a_bounded_ring_buffer(client: httpx.AsyncClient) -> None:
    for n in range(510):
        await client.get("/v1/convai/conversation/token", params={"agent_id": f"a{n}"}, headers=AUTH)
    log = (await client.get("/_emulator/requests")).json()
    assert len(log) == 500
    assert log[0]["query"] == [["agent_id", "a10"]] and log[-1]["query"] == [["agent_id", "a509"]]


async def test_fault_queue_can_be_listed_and_cleared(client: httpx.AsyncClient) -> None:
    queued = await client.post(
        "/_emulator/faults", json={"endpoint": "get", "kind": "rate_limit", "retry_after": 7}
    )
    assert queued.json()["retry_after"] == 7
    assert [f["endpoint"] for f in (await client.get("/_emulator/faults")).json()] == ["get"]
    await client.delete("/_emulator/faults")
    assert (await client.get("/_emulator/faults")).json() == []


@pytest.mark.parametrize(
    "fault",
    [
        {"endpoint": "everything"},
        {"kind": "explode"},
        {"status": 42},
        {"status": "503"},
        {"delay_seconds": -1},
        {"times": 0},
        {"retry_after": 1.5},
        {"bogus": True},
    ],
)
async def test_invalid_faults_are_rejected(client: httpx.AsyncClient, fault: dict[str, object]) -> None:
    response = await client.post("/_emulator/faults", json=fault)
    assert response.status_code == 400
    assert (await client.get("/_emulator/faults")).json() == []

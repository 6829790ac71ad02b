"""Details, audio, feedback, delete, signed URL and token endpoints, and the api key check on all of them."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from service.emulator import FAKE_SECRETS, audio_bytes
from tests.emulator.conftest import AUTH, create
from tests.support.servers import ServedApp

CONV = "/v1/convai/conversations/conv_x"
UPSTREAM_ROUTES = [
    ("GET", "/v1/convai/conversations"),
    ("GET", CONV),
    ("DELETE", CONV),
    ("GET", f"{CONV}/audio"),
    ("POST", f"{CONV}/feedback"),
    ("GET", "/v1/convai/conversation/get-signed-url?agent_id=agent_demo"),
    ("GET", "/v1/convai/conversation/token?agent_id=agent_demo"),
]


@pytest.mark.parametrize(("method", "path"), UPSTREAM_ROUTES)
@pytest.mark.parametrize("headers", [{}, {"xi-api-key": "wrong"}, {"xi-api-key": ""}])
async def test_upstream_routes_reject_a_missing_or_wrong_api_key(
    client: httpx.AsyncClient, method: str, path: str, headers: dict[str, str]
) -> None:
    await create(client, conversation_id="conv_x")
    response = await client.request(method, path, headers=headers, json={"feedback": "like"})
    assert response.status_code == 401
    assert response.json()["detail"]["status"] == "invalid_api_key"
    assert (await client.get(CONV, headers=AUTH)).json()["metadata"]["feedback"]["overall_score"] is None


async def test_details_are_the_full_model_with_the_secrets_redaction_must_remove(
    client: httpx.AsyncClient,
) -> None:
    created = await create(
        client,
        conversation_id="conv_x",
        user_id="alice",
        tool_names=["get_order_status", "search_knowledge_base", "create_calendar_event", "end_call"],
        dynamic_variables={"secret__session_key": "sess-emu-abc"},
    )
    details = (await client.get(CONV, headers=AUTH)).json()
    assert details == created
    assert {"agent_id", "conversation_id", "status", "transcript", "metadata", "has_audio"} <= details.keys()
    assert details["user_id"] == "alice" and details["status"] == "done"
    calls = {call["tool_name"]: call for turn in details["transcript"] for call in turn["tool_calls"]}
    webhook = calls["get_order_status"]["tool_details"]
    assert webhook["type"] == "webhook"
    assert webhook["headers"]["Authorization"].startswith("Bearer sk-")
    assert webhook["query_params"] and webhook["path_params"] and webhook["body"]
    mcp = calls["search_knowledge_base"]["tool_details"]
    assert mcp["type"] == "mcp" and mcp["parameters"]
    integration = calls["create_calendar_event"]["tool_details"]
    assert integration["webhook_details"]["headers"]["Authorization"].startswith("Bearer sk-")
    variables = details["conversation_initiation_client_data"]["dynamic_variables"]
    assert variables["secret__session_key"] == "sess-emu-abc"
    assert any(name.startswith("secret__") and name != "secret__session_key" for name in variables)
    assert details["metadata"]["charging"]["call_charge"] > 0
    assert details["metadata"]["cost"] > 0
    assert details["analysis"]["transcript_summary"]
    text = (await client.get(CONV, headers=AUTH)).text
    assert [secret for secret in FAKE_SECRETS if secret not in text] == []


async def test_unknown_conversation_is_404_on_every_conversation_route(client: httpx.AsyncClient) -> None:
    for method, path in [
        ("GET", CONV),
        ("DELETE", CONV),
        ("GET", f"{CONV}/audio"),
        ("POST", f"{CONV}/feedback"),
    ]:
        response = await client.request(method, path, headers=AUTH, json={"feedback": "like"})
        assert response.status_code == 404, (method, path)
        assert response.json()["detail"]["status"] == "conversation_not_found"


async def test_audio_is_deterministic_mp3_bytes_of_the_seeded_size(client: httpx.AsyncClient) -> None:
    await create(client, conversation_id="conv_x", audio_size_bytes=100_000)
    await create(client, conversation_id="conv_y")
    response = await client.get(f"{CONV}/audio", headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"] == "audio/mpeg"
    assert response.headers["content-length"] == "100000"
    assert response.content == audio_bytes("conv_x", 100_000)
    assert response.content.startswith(b"ID3") and b"\xff\xfb" in response.content[:16]
    default = await client.get("/v1/convai/conversations/conv_y/audio", headers=AUTH)
    assert len(default.content) == 32 * 1024
    assert default.content != response.content[: 32 * 1024]


async def test_conversation_without_audio_answers_404(client: httpx.AsyncClient) -> None:
    created = await create(client, conversation_id="conv_x", audio_size_bytes=0)
    assert created["has_audio"] is False
    response = await client.get(f"{CONV}/audio", headers=AUTH)
    assert response.status_code == 404


def test_large_audio_is_streamed_in_chunks(served: ServedApp) -> None:
    size = 20 * 1024 * 1024 + 7
    with httpx.Client(base_url=served.url) as http:
        http.post("/_emulator/conversations", json={"conversation_id": "conv_x", "audio_size_bytes": size})
        chunks = 0
        received = 0
        with http.stream("GET", f"{CONV}/audio", headers=AUTH) as response:
            assert response.headers["content-length"] == str(size)
            for chunk in response.iter_raw():
                chunks += 1
                received += len(chunk)
    assert received == size
    assert chunks > 10


@pytest.mark.parametrize("score", ["like", "dislike"])
async def test_feedback_is_stored_and_can_be_cleared(client: httpx.AsyncClient, score: str) -> None:
    await create(client, conversation_id="conv_x")
    response = await client.post(f"{CONV}/feedback", json={"feedback": score}, headers=AUTH)
    assert response.status_code == 200 and response.json() == {}
    feedback = (await client.get(CONV, headers=AUTH)).json()["metadata"]["feedback"]
    assert feedback["overall_score"] == score
    assert feedback["likes" if score == "like" else "dislikes"] == 1
    await client.post(f"{CONV}/feedback", json={"feedback": None}, headers=AUTH)
    assert (await client.get(CONV, headers=AUTH)).json()["metadata"]["feedback"]["overall_score"] is None


@pytest.mark.parametrize(
    ("content", "loc"),
    [
        (b'{"feedback": "meh"}', ["body", "feedback"]),
        (b'{"feedback": 5}', ["body", "feedback"]),
        (b'{"feedback": "LIKE"}', ["body", "feedback"]),
        (b"[]", ["body"]),
        (b"", ["body"]),
        (b"{not json", ["body", 0]),
    ],
)
async def test_invalid_feedback_body_is_422(
    client: httpx.AsyncClient, content: bytes, loc: list[str | int]
) -> None:
    await create(client, conversation_id="conv_x", feedback="like")
    headers = {**AUTH, "content-type": "application/json"}
    response = await client.post(f"{CONV}/feedback", content=content, headers=headers)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == loc
    assert (await client.get(CONV, headers=AUTH)).json()["metadata"]["feedback"]["overall_score"] == "like"


async def test_delete_removes_the_conversation(client: httpx.AsyncClient) -> None:
    await create(client, conversation_id="conv_x")
    await create(client, conversation_id="conv_y")
    response = await client.delete(CONV, headers=AUTH)
    assert response.status_code == 200 and response.json() == {}
    assert (await client.get(CONV, headers=AUTH)).status_code == 404
    assert (await client.delete(CONV, headers=AUTH)).status_code == 404
    rows = (await client.get("/v1/convai/conversations", headers=AUTH)).json()["conversations"]
    assert [row["conversation_id"] for row in rows] == ["conv_y"]


async def test_signed_url_points_at_the_request_host_with_a_fresh_conversation_id(
    client: httpx.AsyncClient,
) -> None:
    params = {"agent_id": "agent_demo", "include_conversation_id": "true"}
    first = (await client.get("/v1/convai/conversation/get-signed-url", params=params, headers=AUTH)).json()
    second = (await client.get("/v1/convai/conversation/get-signed-url", params=params, headers=AUTH)).json()
    assert set(first) == {"signed_url"}
    url = urlsplit(first["signed_url"])
    query = parse_qs(url.query)
    assert (url.scheme, url.netloc, url.path) == ("ws", "emulator.test", "/v1/convai/conversation")
    assert query["agent_id"] == ["agent_demo"]
    assert re.fullmatch(r"conv_[0-9a-z]{26}", query["conversation_id"][0])
    assert len(query["conversation_signature"][0]) >= 32
    other = parse_qs(urlsplit(second["signed_url"]).query)
    assert other["conversation_id"] != query["conversation_id"]
    assert other["conversation_signature"] != query["conversation_signature"]


@pytest.mark.parametrize("include", [None, "false"])
async def test_signed_url_has_no_conversation_id_unless_asked(
    client: httpx.AsyncClient, include: str | None
) -> None:
    params = {"agent_id": "agent_demo", **({"include_conversation_id": include} if include else {})}
    body = (await client.get("/v1/convai/conversation/get-signed-url", params=params, headers=AUTH)).json()
    assert "conversation_id" not in parse_qs(urlsplit(body["signed_url"]).query)


async def test_config_switch_puts_the_conversation_id_in_the_body(client: httpx.AsyncClient) -> None:
    response = await client.post("/_emulator/config", json={"signed_url_id_in_body": True})
    assert response.json() == {"signed_url_id_in_body": True, "token_conversation_id": False}
    params = {"agent_id": "agent_demo", "include_conversation_id": "true"}
    body = (await client.get("/v1/convai/conversation/get-signed-url", params=params, headers=AUTH)).json()
    assert body["conversation_id"] == parse_qs(urlsplit(body["signed_url"]).query)["conversation_id"][0]
    assert (await client.post("/_emulator/config", json={"other": 1})).status_code == 400
    assert (await client.post("/_emulator/config", json={"signed_url_id_in_body": "yes"})).status_code == 400


@pytest.mark.parametrize(
    ("path", "loc"),
    [
        ("/v1/convai/conversation/get-signed-url", ["query", "agent_id"]),
        ("/v1/convai/conversation/get-signed-url?agent_id=a&include_conversation_id=maybe", None),
        ("/v1/convai/conversation/token", ["query", "agent_id"]),
        ("/v1/convai/conversation/token?participant_name=alice", ["query", "agent_id"]),
    ],
)
async def test_session_routes_validate_their_parameters(
    client: httpx.AsyncClient, path: str, loc: list[str] | None
) -> None:
    response = await client.get(path, headers=AUTH)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == (loc or ["query", "include_conversation_id"])


async def test_token_is_an_opaque_random_string(client: httpx.AsyncClient) -> None:
    params = {"agent_id": "agent_demo", "participant_name": "alice"}
    first = await client.get("/v1/convai/conversation/token", params=params, headers=AUTH)
    second = await client.get("/v1/convai/conversation/token", params=params, headers=AUTH)
    assert first.status_code == 200
    assert set(first.json()) == {"token"}
    assert len(first.json()["token"]) >= 32
    assert first.json()["token"] != second.json()["token"]


async def test_config_switch_adds_a_conversation_id_to_tokens(client: httpx.AsyncClient) -> None:
    await client.post("/_emulator/config", json={"token_conversation_id": True})
    body = (await client.get("/v1/convai/conversation/token", params={"agent_id": "a"}, headers=AUTH)).json()
    assert set(body) == {"token", "conversation_id"}
    assert re.fullmatch(r"conv_[0-9a-z]{26}", body["conversation_id"])


async def test_unknown_routes_answer_fastapi_style_json(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/convai/nothing-here", headers=AUTH)
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}
    assert (await client.put("/v1/convai/conversations", headers=AUTH)).status_code == 405

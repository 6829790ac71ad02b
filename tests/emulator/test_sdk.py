"""The official `elevenlabs` SDK, pointed at the emulator, calls all 7 endpoints and parses every answer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from elevenlabs import ElevenLabs
from elevenlabs.core.api_error import ApiError
from elevenlabs.errors import UnprocessableEntityError
from elevenlabs.types import (
    ConversationSignedUrlResponseModel,
    GetConversationResponseModel,
    GetConversationsPageResponseModel,
    TokenResponseModel,
)

from service.emulator import audio_bytes, create_emulator_app
from tests.emulator.conftest import API_KEY
from tests.support.servers import ServedApp, serve

ALL_TOOLS = [
    "get_order_status",
    "search_knowledge_base",
    "create_calendar_event",
    "show_product_card",
    "end_call",
]


@pytest.fixture
def seeded() -> Iterator[ServedApp]:
    """Serve an emulator with its sample data plus a conversation using every kind of tool."""
    with serve(create_emulator_app(API_KEY), ws="websockets-sansio") as server:
        with httpx.Client(base_url=server.url) as http:
            spec = {"conversation_id": "conv_alltools", "user_id": "alice", "tool_names": ALL_TOOLS}
            assert http.post("/_emulator/conversations", json=spec).status_code == 200
        yield server


@pytest.fixture
def sdk(seeded: ServedApp) -> Iterator[ElevenLabs]:
    """Yield the official SDK client aimed at the emulator."""
    with httpx.Client(timeout=10) as http:
        yield ElevenLabs(api_key=API_KEY, base_url=seeded.url, httpx_client=http)


def raw(seeded: ServedApp, path: str, **params: Any) -> Any:
    """Return an endpoint's JSON body, fetched without the SDK, for strict model validation."""
    with httpx.Client(base_url=seeded.url, headers={"xi-api-key": API_KEY}) as http:
        return http.get(path, params=params).json()


def test_sdk_lists_and_strictly_validates_every_page(sdk: ElevenLabs, seeded: ServedApp) -> None:
    conversations = sdk.conversational_ai.conversations
    page = conversations.list(page_size=2, summary_mode="include")
    assert isinstance(page, GetConversationsPageResponseModel)
    assert page.has_more is True and page.next_cursor
    assert all(row.transcript_summary is not None for row in page.conversations)
    seen = [row.conversation_id for row in page.conversations]
    while page.has_more:
        page = conversations.list(page_size=2, cursor=page.next_cursor)
        seen += [row.conversation_id for row in page.conversations]
    assert "conv_alltools" in seen and len(seen) == len(set(seen)) >= 5
    filtered = conversations.list(
        user_id="alice",
        agent_id="agent_demo",
        call_successful="success",
        tool_names=["search_knowledge_base", "create_calendar_event"],
        evaluation_params=["resolved_issue:success"],
        data_collection_params=["order_id:in:4417|5120"],
        rating_min=1,
        has_feedback_comment=True,
        search="order",
    )
    assert [row.conversation_id for row in filtered.conversations] == ["conv_01alice0order0status00000a"]
    GetConversationsPageResponseModel.model_validate(raw(seeded, "/v1/convai/conversations", page_size=100))


def test_sdk_gets_details_of_every_conversation_with_all_tool_kinds(
    sdk: ElevenLabs, seeded: ServedApp
) -> None:
    ids = [
        row.conversation_id for row in sdk.conversational_ai.conversations.list(page_size=100).conversations
    ]
    for conversation_id in ids:
        details = sdk.conversational_ai.conversations.get(conversation_id)
        assert isinstance(details, GetConversationResponseModel)
        assert details.conversation_id == conversation_id
        strict = GetConversationResponseModel.model_validate(
            raw(seeded, f"/v1/convai/conversations/{conversation_id}")
        )
        assert strict.metadata.start_time_unix_secs == details.metadata.start_time_unix_secs
    details = GetConversationResponseModel.model_validate(
        raw(seeded, "/v1/convai/conversations/conv_alltools")
    )
    kinds = {
        type(call.tool_details).__name__.rsplit("_", 1)[-1]
        for turn in details.transcript
        for call in turn.tool_calls or []
        if call.tool_details is not None
    }
    assert kinds == {"Webhook", "Mcp", "ApiIntegrationWebhook", "Client"}
    assert details.metadata.charging is not None and details.metadata.charging.llm_usage is not None
    assert details.analysis is not None and details.analysis.call_successful == "success"
    assert details.conversation_initiation_client_data is not None
    assert details.conversation_initiation_client_data.user_id == "alice"


def test_sdk_mints_signed_urls_and_webrtc_tokens(sdk: ElevenLabs, seeded: ServedApp) -> None:
    conversations = sdk.conversational_ai.conversations
    signed = conversations.get_signed_url(agent_id="agent_demo", include_conversation_id=True)
    assert isinstance(signed, ConversationSignedUrlResponseModel)
    assert parse_qs(urlsplit(signed.signed_url).query)["conversation_id"][0].startswith("conv_")
    ConversationSignedUrlResponseModel.model_validate(
        raw(seeded, "/v1/convai/conversation/get-signed-url", agent_id="agent_demo")
    )
    token = conversations.get_webrtc_token(agent_id="agent_demo", participant_name="alice")
    assert isinstance(token, TokenResponseModel) and token.token
    # SDK 2.x requires the conversation_id newer upstream versions return; the emulator adds it on request.
    with httpx.Client(base_url=seeded.url) as http:
        http.post("/_emulator/config", json={"token_conversation_id": True})
    token = conversations.get_webrtc_token(agent_id="agent_demo")
    assert token.conversation_id.startswith("conv_")
    TokenResponseModel.model_validate(raw(seeded, "/v1/convai/conversation/token", agent_id="agent_demo"))


def test_sdk_sends_feedback_streams_audio_and_deletes(sdk: ElevenLabs) -> None:
    conversations = sdk.conversational_ai.conversations
    assert conversations.feedback.create("conv_alltools", feedback="dislike") == {}
    assert conversations.get("conv_alltools").metadata.feedback.overall_score == "dislike"
    assert b"".join(conversations.audio.get("conv_alltools")) == audio_bytes("conv_alltools", 32 * 1024)
    assert conversations.delete("conv_alltools") == {}
    with pytest.raises(ApiError) as missing:
        conversations.get("conv_alltools")
    assert missing.value.status_code == 404


def test_sdk_surfaces_the_emulators_errors(seeded: ServedApp) -> None:
    with httpx.Client() as http:
        wrong = ElevenLabs(api_key="wrong", base_url=seeded.url, httpx_client=http)
        with pytest.raises(ApiError) as unauthorized:
            wrong.conversational_ai.conversations.list()
        assert unauthorized.value.status_code == 401
        right = ElevenLabs(api_key=API_KEY, base_url=seeded.url, httpx_client=http)
        with pytest.raises(UnprocessableEntityError):
            right.conversational_ai.conversations.list(page_size=500)

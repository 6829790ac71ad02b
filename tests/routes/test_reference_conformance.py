"""The gateway against answers and formats the upstream reference documents but the emulator never produces.

Reference: /work/shared/upstream/elevenlabs-convai-conversations-api.md. Each test uses either the emulator
(where it already accepts the documented form) or a purpose-built Starlette upstream served over loopback
HTTP that answers exactly what the reference allows; real JWTs, real Redis, the real app and lifespan.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support.gateway import Gateway, run_gateway
from tests.support.servers import serve

LIST = "/v1/convai/conversations"
UPSTREAM_KEY = "xi-reference-conformance-key-5e7d9c1a3b"


@contextlib.asynccontextmanager
async def gateway_before(app: Starlette, redis_url: str, **env: str) -> AsyncIterator[Gateway]:
    """Run a whole gateway whose upstream is `app`, served by uvicorn on loopback."""
    with serve(app, ws="none") as upstream:
        async with run_gateway(upstream.url, UPSTREAM_KEY, redis_url, env) as gw:
            yield gw


# --- list: data_collection_params (reference lines 132-144) -------------------------------------------
# "Format: id:op:value where op is one of eq|neq|gt|gte|lt|lte|in|exists|missing." The gateway only lets
# exists/missing through in an undocumented two-part form (`id:exists`) and refuses the documented one.


@pytest.mark.parametrize("value", ["email:exists:", "phone:missing:", "email:exists:true"])
async def test_documented_three_part_exists_and_missing_filters_are_passed_through(
    gateway: Gateway, value: str
) -> None:
    response = await gateway.client.get(
        LIST, params={"data_collection_params": value}, headers=gateway.headers("alice")
    )
    assert response.status_code == 200, response.text
    [call] = [r for r in await gateway.upstream_requests() if r["endpoint"] == "list"]
    assert ["data_collection_params", value] in call["query"]


# --- list: next_cursor (reference lines 275-278: `string | null`, no length bound) -----------------------


def paging_upstream(upstream_cursor: str) -> Starlette:
    """An upstream whose first page hands out `upstream_cursor` and whose second page accepts it."""
    row = {
        "agent_id": "agent_demo",
        "start_time_unix_secs": 1_700_000_000,
        "call_duration_secs": 30,
        "message_count": 4,
        "status": "done",
        "call_successful": "success",
    }

    async def conversations(request: Request) -> Response:
        if request.query_params.get("cursor") is None:
            page = {"conversations": [{**row, "conversation_id": "conv_page1"}], "has_more": True}
            return JSONResponse({**page, "next_cursor": upstream_cursor})
        if request.query_params["cursor"] != upstream_cursor:
            return JSONResponse({"detail": []}, status_code=422)
        page = {"conversations": [{**row, "conversation_id": "conv_page2"}], "has_more": False}
        return JSONResponse({**page, "next_cursor": None})

    return Starlette(routes=[Route(LIST, conversations)])


@pytest.mark.parametrize("length", [1_500, 5_000])
async def test_a_long_upstream_cursor_still_reaches_the_next_page(redis_url: str, length: int) -> None:
    upstream_cursor = ("eyJzdGFydCI6MTcwMDAwMDAwMH0" * 200)[:length]
    async with gateway_before(paging_upstream(upstream_cursor), redis_url, OWNERSHIP_MODE="user_id") as gw:
        first = await gw.client.get(LIST, headers=gw.headers("alice"))
        assert first.status_code == 200, first.text
        assert first.json()["has_more"] is True
        cursor = first.json()["next_cursor"]
        assert isinstance(cursor, str)
        second = await gw.client.get(LIST, params={"cursor": cursor}, headers=gw.headers("alice"))
        assert second.status_code == 200, second.text
        assert [row["conversation_id"] for row in second.json()["conversations"]] == ["conv_page2"]


# --- feedback and delete: 200 "Any type" (reference lines 2335-2341 and 3081-3087) -----------------------


def any_type_upstream(answer: Any) -> Starlette:
    """An upstream that owns conv_any for alice and answers feedback and delete with the JSON `answer`."""

    async def details(request: Request) -> Response:
        return JSONResponse(
            {
                "agent_id": "agent_demo",
                "conversation_id": request.path_params["conversation_id"],
                "status": "done",
                "user_id": "alice",
                "transcript": [],
                "metadata": {"start_time_unix_secs": 1_700_000_000, "call_duration_secs": 30},
                "has_audio": False,
                "has_user_audio": False,
                "has_response_audio": False,
            }
        )

    async def raw_answer(request: Request) -> Response:
        await request.body()
        return Response(json.dumps(answer), media_type="application/json")

    conversation = LIST + "/{conversation_id}"
    return Starlette(
        routes=[
            Route(conversation, details, methods=["GET"]),
            Route(conversation, raw_answer, methods=["DELETE"]),
            Route(conversation + "/feedback", raw_answer, methods=["POST"]),
        ]
    )


@pytest.mark.parametrize("answer", [None, "ok", True, ["done"]], ids=["null", "string", "bool", "list"])
@pytest.mark.parametrize("route", ["feedback", "delete"])
async def test_documented_any_type_answers_keep_their_shape(redis_url: str, answer: Any, route: str) -> None:
    async with gateway_before(any_type_upstream(answer), redis_url, OWNERSHIP_MODE="user_id") as gw:
        headers = gw.headers("alice", scopes="convai:history convai:delete")
        if route == "feedback":
            response = await gw.client.post(
                f"{LIST}/conv_any/feedback",
                content=b'{"feedback": "like"}',
                headers={**headers, "Content-Type": "application/json"},
            )
        else:
            response = await gw.client.delete(f"{LIST}/conv_any", headers=headers)
        assert response.status_code == 200, response.text
        # DESIGN section 1: "Response bodies keep the upstream JSON shapes".
        assert response.json() == answer


async def test_an_upstream_cursor_too_long_to_hand_on_is_a_bad_gateway(redis_url: str) -> None:
    # Never a cursor the gateway would then refuse (a pagination dead end): 502 at once.
    upstream_cursor = "c" * 7_000
    async with gateway_before(paging_upstream(upstream_cursor), redis_url, OWNERSHIP_MODE="user_id") as gw:
        first = await gw.client.get(LIST, headers=gw.headers("alice"))
    assert (first.status_code, first.json()["code"]) == (502, "upstream_error")

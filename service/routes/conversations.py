"""The caller's conversations: list, details, audio, feedback, delete (DESIGN sections 1, 3, 4).

A user never sees, hears, rates or deletes another user's conversation, whatever they send:

- the list is always asked upstream with `user_id` = the caller (a client `user_id` is a 422), and every
  row the ownership mode does not grant, or whose agent the token may not use, is dropped; the
  `next_cursor` handed out is sealed to the caller (`service.cursors`);
- every per-conversation route validates the id before it touches a URL and goes through
  `service.ownership` (`owned_conversation` for details, `authorize_conversation` for audio, feedback and
  delete), which answers the same 404 for missing and foreign conversations;
- details are redacted (`service.redaction`), audio is streamed chunk by chunk and the upstream stream is
  closed as soon as the client goes away.

Responses carry `Cache-Control: private, no-store` (they are one user's data) and the rate-limit headers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from service import validation
from service.cursors import CursorSealer
from service.errors import (
    GatewayError,
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
    UpstreamError,
    headers_on_error,
    upstream_not_found_is_an_error,
)
from service.observability import audit, current_request_id
from service.ownership import (
    agent_visible,
    authorize_conversation,
    grants,
    owned_conversation,
    uniform_not_found,
)
from service.ratelimit import enforce
from service.redaction import redact
from service.responses import JsonAnswer
from service.settings import DELETE_SCOPE, HISTORY_SCOPE
from service.state import principal_of, services_of

if TYPE_CHECKING:
    from service.auth import Principal
    from service.ledger import LedgerEntry
    from service.state import Services
    from service.upstream import AudioStream

logger = logging.getLogger("service.routes.conversations")

LIST_ROUTE = "/v1/convai/conversations"
DETAILS_ROUTE = "/v1/convai/conversations/{conversation_id}"
AUDIO_ROUTE = "/v1/convai/conversations/{conversation_id}/audio"
FEEDBACK_ROUTE = "/v1/convai/conversations/{conversation_id}/feedback"
PRIVATE_HEADERS: Mapping[str, str] = {"Cache-Control": "private, no-store"}

MAX_FEEDBACK_BYTES = 1024
FEEDBACK_VALUES = ("like", "dislike", None)
MAX_REPEATED = 20
MAX_SEARCH_LENGTH = 200
MAX_TOOL_NAME_LENGTH = 128
MAX_FILTER_VALUE_LENGTH = 200
MAX_UNIX_SECONDS = 10**11  # year ~5138: anything larger is a client bug, not a date
MAX_DURATION_SECONDS = 10**9
EVALUATION_RESULTS = ("success", "failure", "unknown")
DATA_COLLECTION_OPS = ("eq", "neq", "gt", "gte", "lt", "lte", "in", "exists", "missing")
VALUELESS_OPS = ("exists", "missing")

LIST_SINGLE = (
    "cursor",
    "agent_id",
    "call_successful",
    "call_start_before_unix",
    "call_start_after_unix",
    "call_duration_min_secs",
    "call_duration_max_secs",
    "rating_min",
    "rating_max",
    "has_feedback_comment",
    "page_size",
    "summary_mode",
    "search",
)
LIST_REPEATED = ("evaluation_params", "data_collection_params", "tool_names")
_INTEGER_BOUNDS: Mapping[str, tuple[int, int]] = {
    "call_start_before_unix": (0, MAX_UNIX_SECONDS),
    "call_start_after_unix": (0, MAX_UNIX_SECONDS),
    "call_duration_min_secs": (0, MAX_DURATION_SECONDS),
    "call_duration_max_secs": (0, MAX_DURATION_SECONDS),
    "rating_min": (1, 5),
    "rating_max": (1, 5),
    "page_size": (1, 100),
}
_CONTENT_TYPE = re.compile(r"[\x21-\x7e]+(?: ?; ?[\x20-\x7e]*)?")

# ------------------------------------------------------------------------------------------------ list


def _text(name: str, value: str, *, max_length: int) -> str:
    if not value or len(value) > max_length or not validation.is_text(value):
        raise InvalidRequest(
            f"{name} must be 1..{max_length} characters without control characters", extra={"parameter": name}
        )
    return value


def _evaluation_param(value: str) -> str:
    criteria, sep, result = value.partition(":")
    if not sep or not validation.is_valid_id(criteria) or result not in EVALUATION_RESULTS:
        raise InvalidRequest(
            "evaluation_params must be criteria_id:success|failure|unknown",
            extra={"parameter": "evaluation_params"},
        )
    return value


def _data_collection_param(value: str) -> str:
    parts = value.split(":", 2)
    problem = InvalidRequest(
        "data_collection_params must be id:op:value with op in "
        f"{'|'.join(DATA_COLLECTION_OPS)} (exists/missing ignore their value; in takes a|b|c)",
        extra={"parameter": "data_collection_params"},
    )
    if len(parts) < 2 or not validation.is_valid_id(parts[0]) or parts[1] not in DATA_COLLECTION_OPS:
        raise problem
    op = parts[1]
    if op in VALUELESS_OPS:
        # The reference's form is id:op:value for every op; exists/missing ignore their value (may be empty),
        # and the two-part id:op is accepted too. Passed on unchanged.
        if len(parts) == 3 and (len(parts[2]) > MAX_FILTER_VALUE_LENGTH or not validation.is_text(parts[2])):
            raise problem
        return value
    if len(parts) != 3:
        raise problem
    operand = parts[2]
    if not operand or len(operand) > MAX_FILTER_VALUE_LENGTH or not validation.is_text(operand):
        raise problem
    if op == "in" and any(item == "" for item in operand.split("|")):
        raise problem
    return value


def list_query(
    params: Iterable[tuple[str, str]],
    principal: Principal,
    allowed_agent_ids: frozenset[str],
    sealer: CursorSealer,
) -> list[tuple[str, str]]:
    """Validate the list query and return the upstream parameters, `user_id` = the caller first."""
    singles, repeated = validation.strict_query(
        params, single=LIST_SINGLE, repeated=(*LIST_REPEATED, "user_id")
    )
    if repeated.pop("user_id"):
        raise InvalidRequest(
            "user_id is set by the gateway to the caller and may not be sent", extra={"parameter": "user_id"}
        )
    upstream: list[tuple[str, str]] = [("user_id", principal.user_id)]

    cursor = singles.get("cursor")
    if cursor:
        # Whatever is wrong with it (too long, a control character), a cursor the gateway did not seal is
        # `invalid_cursor`: a client that starts over on that code must get it for every edited cursor.
        upstream.append(("cursor", sealer.open(principal.user_id, cursor)))
    if "agent_id" in singles:
        agent = validation.agent_id(singles["agent_id"])
        principal.require_agent(agent, allowed_agent_ids)
        upstream.append(("agent_id", agent))
    successful = validation.choice(singles, "call_successful", EVALUATION_RESULTS)
    if successful is not None:
        upstream.append(("call_successful", successful))
    for name, (low, high) in _INTEGER_BOUNDS.items():
        number = validation.integer(singles, name, low=low, high=high)
        if number is not None:
            upstream.append((name, str(number)))
    comment = validation.boolean(singles, "has_feedback_comment")
    if comment is not None:
        upstream.append(("has_feedback_comment", "true" if comment else "false"))
    summary_mode = validation.choice(singles, "summary_mode", ("exclude", "include"))
    if summary_mode is not None:
        upstream.append(("summary_mode", summary_mode))
    search = singles.get("search")
    if search:
        upstream.append(("search", _text("search", search, max_length=MAX_SEARCH_LENGTH)))

    for name, values in repeated.items():
        if len(values) > MAX_REPEATED:
            raise InvalidRequest(f"at most {MAX_REPEATED} {name} values", extra={"parameter": name})
    upstream += [("evaluation_params", _evaluation_param(v)) for v in repeated["evaluation_params"]]
    upstream += [
        ("data_collection_params", _data_collection_param(v)) for v in repeated["data_collection_params"]
    ]
    upstream += [
        ("tool_names", _text("tool_names", v, max_length=MAX_TOOL_NAME_LENGTH))
        for v in repeated["tool_names"]
    ]
    return upstream


async def visible_rows(services: Services, principal: Principal, rows: Any) -> list[dict[str, Any]]:
    """Keep the list rows the ownership mode grants the caller and whose agent the token may use."""
    if not isinstance(rows, list):
        raise UpstreamError("upstream returned a conversation list that is not a list")
    settings = services.settings
    every_agent = principal.agents is None  # the usual token: no per-row agent check to make
    candidates = [
        (conversation_id, row)
        for row in rows
        if isinstance(row, dict)
        and isinstance(conversation_id := row.get("conversation_id"), str)
        and (every_agent or agent_visible(principal, settings.allowed_agent_ids, row.get("agent_id")))
    ]
    mode, caller = settings.ownership_mode, principal.user_id
    entries: dict[str, LedgerEntry] = {}
    if mode != "user_id" and candidates:
        entries = await services.ledger.lookup_many([conversation_id for conversation_id, _ in candidates])
    # The upstream list was asked with user_id = caller, so each row's upstream user_id is the caller's;
    # the ledger still overrules it (a conversation minted for someone else whose client spoofed user_id).
    return [
        row
        for conversation_id, row in candidates
        if grants(mode, caller, entries.get(conversation_id), caller)
    ]


async def list_conversations(request: Request) -> Response:
    """List the caller's conversations, filtered and paginated like upstream."""
    services, principal, headers = await _admit(request, HISTORY_SCOPE, "history")
    settings = services.settings
    with headers_on_error(headers):
        sealer = CursorSealer(settings.elevenlabs_api_key.reveal())
        query = validation.query_params(request.scope["query_string"])
        params = list_query(query, principal, settings.allowed_agent_ids, sealer)
        with upstream_not_found_is_an_error("upstream answered 404 for the conversation list"):
            page = await services.upstream.list_conversations(params)
        if not isinstance(page, dict):
            raise UpstreamError("upstream returned a conversation list that is not an object")
        body = dict(page)
        body["conversations"] = await visible_rows(services, principal, page.get("conversations", []))
        body["has_more"] = bool(page.get("has_more", False))
        next_cursor = page.get("next_cursor")
        body["next_cursor"] = (
            sealer.seal(principal.user_id, next_cursor)
            if isinstance(next_cursor, str) and next_cursor
            else None
        )
    return _json(body, headers)


# ----------------------------------------------------------------------------------- one conversation


async def get_conversation(request: Request) -> Response:
    """Return the caller's conversation, redacted."""
    services, principal, headers = await _admit(request, HISTORY_SCOPE, "history")
    with headers_on_error(headers):
        conversation_id = validation.conversation_id(request.path_params["conversation_id"])
        details = await owned_conversation(services, principal, conversation_id)
    return _json(redact(details, services.settings.redact_fields), headers)


async def get_conversation_audio(request: Request) -> Response:
    """Stream the audio of the caller's conversation from upstream, chunk by chunk."""
    services, principal, headers = await _admit(request, HISTORY_SCOPE, "history")
    with headers_on_error(headers):
        conversation_id = validation.conversation_id(request.path_params["conversation_id"])
        await authorize_conversation(services, principal, conversation_id)
        stack = contextlib.AsyncExitStack()
        try:
            with uniform_not_found():
                audio = await stack.enter_async_context(services.upstream.stream_audio(conversation_id))
        except BaseException:
            await stack.aclose()
            raise
    if audio.content_length is not None and audio.content_length >= 0:
        headers["Content-Length"] = str(audio.content_length)
    content_type = audio.content_type if _CONTENT_TYPE.fullmatch(audio.content_type or "") else None
    return UpstreamAudioResponse(
        audio,
        stack,
        headers=headers,
        media_type=content_type or "audio/mpeg",
        send_timeout=services.settings.upstream_audio_read_timeout,
    )


class UpstreamAudioResponse(Response):
    """Relay an upstream audio stream; the upstream stream is closed when done, failed or disconnected."""

    def __init__(
        self,
        audio: AudioStream,
        closer: contextlib.AsyncExitStack,
        *,
        headers: Mapping[str, str],
        media_type: str,
        send_timeout: float,
    ) -> None:
        """Wrap an entered upstream audio stream; `closer` exits it; a listener stalled `send_timeout` s is cut."""
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self._audio = audio
        self._closer = closer
        self._send_timeout = send_timeout
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the audio as it arrives, stopping (and closing upstream) if the client disconnects."""
        head = scope.get("method") == "HEAD"
        chunks = self._audio.chunks()
        gone = anyio.Event()
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(_watch_disconnect, receive, gone, group.cancel_scope)
                try:
                    await self._pump(chunks, send, gone, head=head)
                finally:
                    group.cancel_scope.cancel()
        finally:
            # Shielded: this must run even when the request task itself is being cancelled.
            with anyio.CancelScope(shield=True):
                try:
                    aclose = getattr(chunks, "aclose", None)
                    if aclose is not None:
                        await aclose()
                finally:
                    await self._closer.aclose()

    async def _pump(self, chunks: AsyncIterator[bytes], send: Send, gone: anyio.Event, *, head: bool) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if head:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        try:
            async for chunk in chunks:
                # Checked every chunk: while upstream data keeps arriving, the reads may never suspend long
                # enough for the cancellation alone to land, and a server's send after a disconnect is a no-op.
                if gone.is_set():
                    return
                if not chunk:
                    continue
                # A listener that stops reading holds an upstream connection and one of the replica's
                # UPSTREAM_MAX_AUDIO_STREAMS places; once the server's buffers are full, a send waits for it.
                with anyio.move_on_after(self._send_timeout) as waited:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if waited.cancelled_caught:
                    logger.info("audio listener accepted nothing for %.0f s; stream cut", self._send_timeout)
                    return
        except GatewayError as exc:
            # Headers are gone: the only honest signal left is an incomplete body (the server drops the
            # connection when the app returns without finishing the response).
            logger.warning("upstream audio stream failed mid-way: %s", type(exc).__name__)
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _watch_disconnect(receive: Receive, gone: anyio.Event, scope: anyio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            # Cancelling also interrupts a pump waiting on a slow upstream.
            scope.cancel()
            return


async def send_feedback(request: Request) -> Response:
    """Rate the caller's conversation: `{"feedback": "like" | "dislike" | null}`."""
    services, principal, headers = await _admit(request, HISTORY_SCOPE, "feedback")
    with headers_on_error(headers):
        conversation_id = validation.conversation_id(request.path_params["conversation_id"])
        feedback = await _feedback_body(request)
        agent_id = await authorize_conversation(services, principal, conversation_id)
        with uniform_not_found():
            result = await services.upstream.send_feedback(conversation_id, feedback)
    _audit("feedback_sent", principal, conversation_id, agent_id, feedback=feedback)
    return _json(result, headers)  # upstream's answer as it is: the reference documents "any type"


async def _feedback_body(request: Request) -> str | None:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaType("the body must be application/json")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_FEEDBACK_BYTES:
        raise PayloadTooLarge(f"the body must be at most {MAX_FEEDBACK_BYTES} bytes")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_FEEDBACK_BYTES:
            raise PayloadTooLarge(f"the body must be at most {MAX_FEEDBACK_BYTES} bytes")
    problem = InvalidRequest(
        'the body must be {"feedback": "like" | "dislike" | null}', extra={"parameter": "body"}
    )
    try:
        body = json.loads(bytes(raw), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise problem from exc
    if not isinstance(body, dict) or set(body) != {"feedback"}:
        raise problem
    feedback = body["feedback"]
    if feedback is None:
        return None
    if not isinstance(feedback, str) or feedback not in FEEDBACK_VALUES:
        raise problem
    return feedback


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            # `{"feedback": "like", "feedback": 1}` means different things to different parsers.
            raise ValueError("duplicate key")
        result[key] = value
    return result


async def delete_conversation(request: Request) -> Response:
    """Delete the caller's conversation upstream and forget it in the ledger."""
    services, principal, headers = await _admit(request, DELETE_SCOPE, "delete")
    with headers_on_error(headers):
        conversation_id = validation.conversation_id(request.path_params["conversation_id"])
        agent_id = await authorize_conversation(services, principal, conversation_id)
        # An upstream 404 keeps the ledger entry: a minted signed URL may still start this conversation.
        with uniform_not_found():
            result = await services.upstream.delete_conversation(conversation_id)
    try:
        await services.ledger.remove(conversation_id)
    except GatewayError as exc:
        # The conversation is gone upstream; a leftover entry grants nothing and expires with its TTL.
        logger.warning("ledger entry not removed after delete: %s", type(exc).__name__)
    _audit("conversation_deleted", principal, conversation_id, agent_id)
    return _json(result, headers)  # upstream's answer as it is: the reference documents "any type"


# ------------------------------------------------------------------------------------------- helpers


def _json(content: Any, headers: Mapping[str, str]) -> JsonAnswer:
    return JsonAnswer(content, headers=headers)


async def _admit(
    request: Request, scope: str, route_class: str
) -> tuple[Services, Principal, dict[str, str]]:
    """Check the scope, then the rate limit; return the response headers every outcome of the request carries."""
    # Scope first, then the rate limit: a request the caller may not make costs no budget.
    services, principal = services_of(request), principal_of(request)
    principal.require_scope(scope)
    decision = await enforce(services.limiter, services.settings, route_class, user_id=principal.user_id)
    return services, principal, {**decision.headers(), **PRIVATE_HEADERS}


def _audit(
    event: str, principal: Principal, conversation_id: str, agent_id: str | None, **fields: Any
) -> None:
    audit(
        event,
        user=principal.user_id,
        actor=principal.actor,
        conversation_id=conversation_id,
        agent_id=agent_id,
        request_id=current_request_id(),
        **fields,
    )


routes: list[Route] = [
    Route(LIST_ROUTE, list_conversations, methods=["GET"], name="list_conversations"),
    Route(DETAILS_ROUTE, get_conversation, methods=["GET"], name="get_conversation"),
    Route(DETAILS_ROUTE, delete_conversation, methods=["DELETE"], name="delete_conversation"),
    Route(AUDIO_ROUTE, get_conversation_audio, methods=["GET"], name="get_conversation_audio"),
    Route(FEEDBACK_ROUTE, send_feedback, methods=["POST"], name="send_conversation_feedback"),
]

"""The upstream emulator: the 7 ElevenLabs convai endpoints, the conversation WebSocket and a control API."""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket

from service.emulator.conversation_ws import run_conversation
from service.emulator.faults import FAULT_HEADER, parse_fault, parse_fault_header
from service.emulator.model import EVALUATION_RESULTS, FEEDBACK_SCORES, Conversation
from service.emulator.samples import audio_chunks, build_conversation, new_conversation_id, seed_specs
from service.emulator.store import SESSION_TTL_SECONDS, EmulatorStore, PendingSession, SortKey

Handler = Callable[[Request], Awaitable[Response]]
DATA_COLLECTION_OPS = ("eq", "neq", "gt", "gte", "lt", "lte", "in", "exists", "missing")
NUMERIC_OPS = ("gt", "gte", "lt", "lte")
_TRUE = frozenset({"true", "1", "yes", "on", "t", "y"})
_FALSE = frozenset({"false", "0", "no", "off", "f", "n"})


def _expected(options: tuple[str, ...]) -> str:
    quoted = [f"'{option}'" for option in options]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _not_found(status: str, message: str) -> JSONResponse:
    return JSONResponse({"detail": {"status": status, "message": message}}, status_code=404)


def _validation_error(errors: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse({"detail": errors}, status_code=422)


class QueryParams:
    """FastAPI-style query parsing: collects every error as a pydantic v2 error object."""

    def __init__(self, request: Request) -> None:
        self.params = request.query_params
        self.errors: list[dict[str, Any]] = []

    def error(
        self, loc: list[str | int], kind: str, msg: str, value: Any, ctx: dict[str, Any] | None = None
    ) -> None:
        """Record one validation error."""
        entry: dict[str, Any] = {"type": kind, "loc": ["query", *loc], "msg": msg, "input": value}
        if ctx is not None:
            entry["ctx"] = ctx
        self.errors.append(entry)

    def string(self, name: str, *, required: bool = False) -> str | None:
        """Return a string parameter; record `missing` when required and absent."""
        value = self.params.get(name)
        if value is None and required:
            self.error([name], "missing", "Field required", None)
        return value

    def integer(self, name: str, *, ge: int | None = None, le: int | None = None) -> int | None:
        """Return an integer parameter, checking its bounds."""
        raw = self.params.get(name)
        if raw is None:
            return None
        try:
            value = int(raw.strip())
        except ValueError:
            self.error(
                [name],
                "int_parsing",
                "Input should be a valid integer, unable to parse string as an integer",
                raw,
            )
            return None
        if ge is not None and value < ge:
            self.error(
                [name],
                "greater_than_equal",
                f"Input should be greater than or equal to {ge}",
                raw,
                {"ge": ge},
            )
            return None
        if le is not None and value > le:
            self.error(
                [name], "less_than_equal", f"Input should be less than or equal to {le}", raw, {"le": le}
            )
            return None
        return value

    def boolean(self, name: str) -> bool | None:
        """Return a boolean parameter, accepting pydantic's spellings."""
        raw = self.params.get(name)
        if raw is None:
            return None
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        self.error([name], "bool_parsing", "Input should be a valid boolean, unable to interpret input", raw)
        return None

    def choice(self, name: str, options: tuple[str, ...]) -> str | None:
        """Return an enum parameter."""
        raw = self.params.get(name)
        if raw is None or raw in options:
            return raw
        expected = _expected(options)
        self.error([name], "enum", f"Input should be {expected}", raw, {"expected": expected})
        return None

    def strings(self, name: str) -> list[str]:
        """Return every value of a repeated parameter."""
        return self.params.getlist(name)


def encode_cursor(key: SortKey) -> str:
    """Return the opaque cursor for the page after `key`."""
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> SortKey:
    """Return the key a cursor stands for; raise ValueError when it is not one of ours."""
    try:
        start, conversation_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, TypeError, binascii.Error) as exc:
        raise ValueError("invalid cursor") from exc
    if not isinstance(start, int) or not isinstance(conversation_id, str):
        raise ValueError("invalid cursor")
    return (start, conversation_id)


def _same(stored: Any, raw: str) -> bool:
    if isinstance(stored, bool):
        return raw.lower() == str(stored).lower()
    if isinstance(stored, int | float):
        try:
            return float(raw) == float(stored)
        except ValueError:
            return False
    return str(stored) == raw


def _data_collection_matches(conversation: Conversation, item_id: str, op: str, raw: str) -> bool:
    present = conversation.data_collection.get(item_id) is not None
    stored = conversation.data_collection.get(item_id)
    if op == "exists" or (op == "neq" and raw == ""):
        return present
    if op == "missing" or (op == "eq" and raw == ""):
        return not present
    if not present:
        return False
    if op == "eq":
        return _same(stored, raw)
    if op == "neq":
        return not _same(stored, raw)
    if op == "in":
        return any(_same(stored, value) for value in raw.split("|"))
    if isinstance(stored, bool) or not isinstance(stored, int | float):
        return False
    value = float(raw)
    return {"gt": stored > value, "gte": stored >= value, "lt": stored < value, "lte": stored <= value}[op]


def _list_filter(params: QueryParams) -> Callable[[Conversation], bool]:
    """Parse the list filters into one predicate (errors land in `params.errors`)."""
    user_id = params.string("user_id")
    agent_id = params.string("agent_id")
    before = params.integer("call_start_before_unix")
    after = params.integer("call_start_after_unix")
    min_duration = params.integer("call_duration_min_secs")
    max_duration = params.integer("call_duration_max_secs")
    rating_min = params.integer("rating_min")
    rating_max = params.integer("rating_max")
    call_successful = params.choice("call_successful", EVALUATION_RESULTS)
    has_comment = params.boolean("has_feedback_comment")
    tool_names = set(params.strings("tool_names"))
    search = (params.string("search") or "").lower()
    evaluations: list[tuple[str, str]] = []
    for index, raw in enumerate(params.strings("evaluation_params")):
        criteria_id, _, result = raw.partition(":")
        if not criteria_id or result not in EVALUATION_RESULTS:
            message = "Value error, expected criteria_id:result with result one of success|failure|unknown"
            params.error(["evaluation_params", index], "value_error", message, raw)
        evaluations.append((criteria_id, result))
    collections: list[tuple[str, str, str]] = []
    for index, raw in enumerate(params.strings("data_collection_params")):
        item_id, _, rest = raw.partition(":")
        op, _, value = rest.partition(":")
        valid = bool(item_id) and op in DATA_COLLECTION_OPS
        if valid and op in NUMERIC_OPS:
            try:
                float(value)
            except ValueError:
                valid = False
        if not valid:
            message = f"Value error, expected id:op:value with op one of {'|'.join(DATA_COLLECTION_OPS)}"
            params.error(["data_collection_params", index], "value_error", message, raw)
        collections.append((item_id, op, value))

    def keep(c: Conversation) -> bool:
        checks = (
            user_id is None or c.user_id == user_id,
            agent_id is None or c.agent_id == agent_id,
            before is None or c.start_time_unix_secs < before,
            after is None or c.start_time_unix_secs > after,
            min_duration is None or c.call_duration_secs >= min_duration,
            max_duration is None or c.call_duration_secs <= max_duration,
            rating_min is None or (c.rating is not None and c.rating >= rating_min),
            rating_max is None or (c.rating is not None and c.rating <= rating_max),
            call_successful is None or c.call_successful == call_successful,
            has_comment is None or bool(c.feedback_comment) == has_comment,
            not tool_names or bool(tool_names.intersection(c.tool_names())),
            not search or any(search in message.lower() for message in c.messages()),
            all(c.evaluations.get(criteria) == result for criteria, result in evaluations),
            all(_data_collection_matches(c, item, op, value) for item, op, value in collections),
        )
        return all(checks)

    return keep


async def _audio_stream(conversation_id: str, size: int) -> AsyncIterator[bytes]:
    for chunk in audio_chunks(conversation_id, size):
        yield chunk


class Emulator:
    """The emulator's state and request handlers; `create_emulator_app` wires them into a Starlette app."""

    def __init__(self, api_key: str, *, clock: Callable[[], float] = time.time) -> None:
        self.api_key = api_key
        self.clock = clock
        self.store = EmulatorStore(clock)

    def seed(self) -> None:
        """Add the sample conversations for agent_demo (users alice and bob)."""
        rng = random.Random(1138)  # noqa: S311 - fixed seed so sample transcripts are the same every run
        now = self.clock()
        for spec in seed_specs(now):
            self.store.add(build_conversation(spec, now=now, new_id=new_conversation_id, rng=rng))

    # Upstream plumbing: log, authenticate, inject faults.

    def upstream(self, endpoint: str, handler: Handler) -> Handler:
        """Wrap a handler with the request log, the `xi-api-key` check and fault injection."""

        async def wrapped(request: Request) -> Response:
            body = await request.body()
            headers: dict[str, str] = {}
            for name, value in request.headers.items():
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
            self.store.log_request(
                {
                    "endpoint": endpoint,
                    "method": request.method,
                    "path": request.url.path,
                    "query": [[name, value] for name, value in request.query_params.multi_items()],
                    "headers": headers,
                    "body": body.decode("utf-8", "replace"),
                    "time": self.clock(),
                }
            )
            if not hmac.compare_digest(request.headers.get("xi-api-key", "").encode(), self.api_key.encode()):
                detail = {"status": "invalid_api_key", "message": "Invalid API key"}
                return JSONResponse({"detail": detail}, status_code=401)
            header = request.headers.get(FAULT_HEADER)
            try:
                fault = parse_fault_header(header) if header else self.store.take_fault(endpoint)
            except ValueError as exc:
                return JSONResponse({"detail": f"bad {FAULT_HEADER} header: {exc}"}, status_code=400)
            if fault is not None:
                await fault.delay()
                replacement = fault.response()
                if replacement is not None:
                    return replacement
            return await handler(request)

        return wrapped

    # The 7 upstream endpoints.

    async def list_conversations(self, request: Request) -> Response:
        """List conversations newest first, filtered and paginated like upstream."""
        params = QueryParams(request)
        keep = _list_filter(params)
        page_size = params.integer("page_size", ge=1, le=100)
        summary_mode = params.choice("summary_mode", ("exclude", "include"))
        before: SortKey | None = None
        cursor = params.string("cursor")
        if cursor:
            try:
                before = decode_cursor(cursor)
            except ValueError:
                params.error(["cursor"], "value_error", "Value error, invalid cursor", cursor)
        if params.errors:
            return _validation_error(params.errors)
        rows, next_key = self.store.page(
            keep, before=before, limit=page_size or 30, include_summary=summary_mode == "include"
        )
        return JSONResponse(
            {
                "conversations": rows,
                "has_more": next_key is not None,
                "next_cursor": None if next_key is None else encode_cursor(next_key),
            }
        )

    async def get_conversation(self, request: Request) -> Response:
        """Return one conversation's full details."""
        details = self.store.details(request.path_params["conversation_id"])
        if details is None:
            return _not_found("conversation_not_found", "Conversation not found")
        return JSONResponse(details)

    async def get_audio(self, request: Request) -> Response:
        """Stream a conversation's audio, generated chunk by chunk."""
        conversation_id = request.path_params["conversation_id"]
        size = self.store.audio_size(conversation_id)
        if size is None:
            return _not_found("conversation_not_found", "Conversation not found")
        if size == 0:
            return _not_found("audio_not_found", "This conversation has no audio")
        return StreamingResponse(
            _audio_stream(conversation_id, size),
            media_type="audio/mpeg",
            headers={"Content-Length": str(size)},
        )

    async def post_feedback(self, request: Request) -> Response:
        """Store a like, dislike or null for a conversation."""
        body = await request.body()
        if not body.strip():
            return _validation_error(
                [{"type": "missing", "loc": ["body"], "msg": "Field required", "input": None}]
            )
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            error = {"type": "json_invalid", "loc": ["body", 0], "msg": "JSON decode error", "input": {}}
            return _validation_error([{**error, "ctx": {"error": str(exc)}}])
        if not isinstance(data, dict):
            msg = "Input should be a valid dictionary or object to extract fields from"
            return _validation_error(
                [{"type": "model_attributes_type", "loc": ["body"], "msg": msg, "input": data}]
            )
        score = data.get("feedback")
        if score is not None and score not in FEEDBACK_SCORES:
            expected = _expected(FEEDBACK_SCORES)
            error = {
                "type": "enum",
                "loc": ["body", "feedback"],
                "msg": f"Input should be {expected}",
                "input": score,
            }
            return _validation_error([{**error, "ctx": {"expected": expected}}])

        def change(conversation: Conversation) -> None:
            conversation.feedback_score = score

        if not self.store.update(request.path_params["conversation_id"], change):
            return _not_found("conversation_not_found", "Conversation not found")
        return JSONResponse({})

    async def delete_conversation(self, request: Request) -> Response:
        """Delete a conversation."""
        if not self.store.delete(request.path_params["conversation_id"]):
            return _not_found("conversation_not_found", "Conversation not found")
        return JSONResponse({})

    async def get_signed_url(self, request: Request) -> Response:
        """Mint a single-use signed WebSocket URL for an agent."""
        params = QueryParams(request)
        agent_id = params.string("agent_id", required=True)
        include_id = params.boolean("include_conversation_id")
        if params.errors or agent_id is None:
            return _validation_error(params.errors)
        signature = secrets.token_urlsafe(32)
        conversation_id = new_conversation_id() if include_id else None
        self.store.add_session(
            signature, PendingSession(agent_id, conversation_id, self.clock() + SESSION_TTL_SECONDS)
        )
        query = {"agent_id": agent_id, "conversation_signature": signature}
        if conversation_id is not None:
            query["conversation_id"] = conversation_id
        scheme = "wss" if request.url.scheme == "https" else "ws"
        host = request.headers.get("host") or request.url.netloc
        body: dict[str, Any] = {"signed_url": f"{scheme}://{host}/v1/convai/conversation?{urlencode(query)}"}
        if conversation_id is not None and self.store.config.signed_url_id_in_body:
            body["conversation_id"] = conversation_id
        return JSONResponse(body)

    async def get_token(self, request: Request) -> Response:
        """Mint an opaque WebRTC token for an agent."""
        params = QueryParams(request)
        params.string("agent_id", required=True)
        params.string("participant_name")
        if params.errors:
            return _validation_error(params.errors)
        body = {"token": secrets.token_urlsafe(48)}
        if self.store.config.token_conversation_id:
            body["conversation_id"] = new_conversation_id()
        return JSONResponse(body)

    async def conversation_socket(self, websocket: WebSocket) -> None:
        """Serve the conversation WebSocket a signed URL points at."""
        await run_conversation(websocket, self.store, new_conversation_id)

    # The /_emulator/ control API (no api key: a test tool).

    async def _json_body(self, request: Request) -> Any:
        body = await request.body()
        if not body.strip():
            return {}
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"body is not JSON: {exc}") from exc

    async def control_create(self, request: Request) -> Response:
        """Create a conversation from a seeding spec and return its details."""
        try:
            spec = await self._json_body(request)
            if not isinstance(spec, dict):
                raise ValueError("body must be a JSON object")
            conversation = build_conversation(spec, now=self.clock(), new_id=new_conversation_id)
        except ValueError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=400)
        if not self.store.add(conversation):
            return JSONResponse({"detail": "conversation_id already exists"}, status_code=409)
        return JSONResponse(conversation.details())

    async def control_reset(self, request: Request) -> Response:
        """Clear all state; with `{"seed": true}` add the sample conversations again."""
        try:
            data = await self._json_body(request)
        except ValueError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=400)
        self.store.reset()
        if isinstance(data, dict) and data.get("seed") is True:
            self.seed()
        return JSONResponse({})

    async def control_faults(self, request: Request) -> Response:
        """Queue a fault (POST), list the queue (GET) or clear it (DELETE)."""
        if request.method == "GET":
            return JSONResponse(self.store.faults())
        if request.method == "DELETE":
            self.store.clear_faults()
            return JSONResponse({})
        try:
            fault = parse_fault(await self._json_body(request))
        except ValueError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=400)
        self.store.add_fault(fault)
        return JSONResponse(fault.as_json())

    async def control_config(self, request: Request) -> Response:
        """Change config switches and return the current config."""
        try:
            data = await self._json_body(request)
        except ValueError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=400)
        switches = set(self.store.config.as_json())
        if not isinstance(data, dict) or set(data) - switches:
            return JSONResponse(
                {"detail": f"accepted fields: {', '.join(sorted(switches))}"}, status_code=400
            )
        if not all(isinstance(value, bool) for value in data.values()):
            return JSONResponse({"detail": "config switches must be booleans"}, status_code=400)
        for name, value in data.items():
            setattr(self.store.config, name, value)
        return JSONResponse(self.store.config.as_json())

    async def control_requests(self, request: Request) -> Response:
        """Return (GET) or clear (DELETE) the log of recent upstream requests."""
        if request.method == "DELETE":
            self.store.clear_requests()
            return JSONResponse({})
        return JSONResponse(self.store.requests())

    def routes(self) -> list[BaseRoute]:
        """Return the emulator's routes."""
        conversation = "/v1/convai/conversations/{conversation_id}"
        return [
            Route(
                "/v1/convai/conversations", self.upstream("list", self.list_conversations), methods=["GET"]
            ),
            Route(conversation, self.upstream("get", self.get_conversation), methods=["GET"]),
            Route(conversation, self.upstream("delete", self.delete_conversation), methods=["DELETE"]),
            Route(f"{conversation}/audio", self.upstream("audio", self.get_audio), methods=["GET"]),
            Route(
                f"{conversation}/feedback", self.upstream("feedback", self.post_feedback), methods=["POST"]
            ),
            Route(
                "/v1/convai/conversation/get-signed-url",
                self.upstream("get_signed_url", self.get_signed_url),
                methods=["GET"],
            ),
            Route("/v1/convai/conversation/token", self.upstream("token", self.get_token), methods=["GET"]),
            WebSocketRoute("/v1/convai/conversation", self.conversation_socket),
            Route("/_emulator/conversations", self.control_create, methods=["POST"]),
            Route("/_emulator/reset", self.control_reset, methods=["POST"]),
            Route("/_emulator/faults", self.control_faults, methods=["GET", "POST", "DELETE"]),
            Route("/_emulator/config", self.control_config, methods=["POST"]),
            Route("/_emulator/requests", self.control_requests, methods=["GET", "DELETE"]),
        ]


async def _http_error(request: Request, exc: Exception) -> Response:
    """Answer routing errors (404, 405) with FastAPI's JSON shape."""
    assert isinstance(exc, HTTPException)  # noqa: S101 - registered for HTTPException only
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def create_emulator_app(
    api_key: str, *, seed: bool = True, clock: Callable[[], float] = time.time
) -> Starlette:
    """Build the emulator ASGI app; `app.state.emulator` exposes its Emulator (store, seed) to tests."""
    emulator = Emulator(api_key, clock=clock)
    if seed:
        emulator.seed()
    app = Starlette(routes=emulator.routes(), exception_handlers={HTTPException: _http_error})
    app.state.emulator = emulator
    return app

"""The OpenAPI 3.1 document of the gateway's own API, built from the app's routes.

Paths and methods come from the mounted routes; what each operation means comes from OPERATIONS below.
`build_document` refuses to describe a route it has no entry for (and vice versa), so the document cannot
drift from the app: a test builds it from the real app.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.routing import BaseRoute, Route

from service.cursors import MAX_CURSOR_LENGTH

PROBLEM = {"$ref": "#/components/schemas/Problem"}

_ID = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,128}$"}
_AGENT_QUERY = {"name": "agent_id", "in": "query", "required": True, "schema": _ID}
_CONVERSATION_PATH = {"name": "conversation_id", "in": "path", "required": True, "schema": _ID}


def _query(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    param: dict[str, Any] = {"name": name, "in": "query", "required": False, "schema": schema}
    if description:
        param["description"] = description
    return param


def _repeated(name: str, pattern: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "style": "form",
        "explode": True,
        "schema": {"type": "array", "maxItems": 20, "items": {"type": "string", "pattern": pattern}},
        "description": description,
    }


@dataclass(frozen=True, slots=True)
class Operation:
    """What one method on one path does, for the document."""

    summary: str
    scope: str | None = None
    parameters: tuple[dict[str, Any], ...] = ()
    request_body: dict[str, Any] | None = None
    responses: dict[str, dict[str, Any]] = field(default_factory=dict)
    tags: tuple[str, ...] = ()


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS_AUTH = {
    "401": {"$ref": "#/components/responses/Unauthorized"},
    "403": {"$ref": "#/components/responses/Forbidden"},
    "422": {"$ref": "#/components/responses/Invalid"},
    "429": {"$ref": "#/components/responses/RateLimited"},
    "502": {"$ref": "#/components/responses/UpstreamError"},
    "503": {"$ref": "#/components/responses/Unavailable"},
    "504": {"$ref": "#/components/responses/UpstreamTimeout"},
}
_ERRORS_OWNED = {**_ERRORS_AUTH, "404": {"$ref": "#/components/responses/NotFound"}}

OPERATIONS: dict[tuple[str, str], Operation] = {
    ("GET", "/v1/convai/conversation/get-signed-url"): Operation(
        summary="Mint a signed WebSocket URL for an allowed agent and record the caller as its owner",
        scope="convai:session",
        parameters=(
            _AGENT_QUERY,
            _query("branch_id", _ID),
            _query(
                "include_conversation_id",
                {"type": "boolean", "enum": [True]},
                "Accepted for upstream compatibility; the conversation id is always included",
            ),
        ),
        responses={
            "200": _json(
                {
                    "type": "object",
                    "required": ["signed_url", "conversation_id", "expires_at"],
                    "properties": {
                        "signed_url": {"type": "string"},
                        "conversation_id": {"type": "string"},
                        "expires_at": {"type": "integer", "description": "Unix seconds"},
                    },
                }
            ),
            **_ERRORS_AUTH,
        },
        tags=("sessions",),
    ),
    ("GET", "/v1/convai/conversation/token"): Operation(
        summary="Mint a WebRTC conversation token for an allowed agent (participant = the caller)",
        scope="convai:session",
        parameters=(_AGENT_QUERY, _query("branch_id", _ID)),
        responses={
            "200": _json(
                {"type": "object", "required": ["token"], "properties": {"token": {"type": "string"}}}
            ),
            **_ERRORS_AUTH,
        },
        tags=("sessions",),
    ),
    ("GET", "/v1/convai/conversations"): Operation(
        summary="List the caller's conversations (user_id is forced to the caller)",
        scope="convai:history",
        parameters=(
            _query("cursor", {"type": "string", "maxLength": MAX_CURSOR_LENGTH}),
            _query("agent_id", _ID),
            _query("call_successful", {"type": "string", "enum": ["success", "failure", "unknown"]}),
            # The maxima are the gateway's own bounds (service.routes.conversations._INTEGER_BOUNDS).
            _query("call_start_before_unix", {"type": "integer", "minimum": 0, "maximum": 10**11}),
            _query("call_start_after_unix", {"type": "integer", "minimum": 0, "maximum": 10**11}),
            _query("call_duration_min_secs", {"type": "integer", "minimum": 0, "maximum": 10**9}),
            _query("call_duration_max_secs", {"type": "integer", "minimum": 0, "maximum": 10**9}),
            _query("rating_min", {"type": "integer", "minimum": 1, "maximum": 5}),
            _query("rating_max", {"type": "integer", "minimum": 1, "maximum": 5}),
            _query("has_feedback_comment", {"type": "boolean"}),
            _repeated(
                "evaluation_params",
                "^[A-Za-z0-9_-]{1,128}:(success|failure|unknown)$",
                "criteria_id:result",
            ),
            _repeated(
                "data_collection_params",
                # exists/missing ignore their value (empty or left out), gt/gte/lt/lte take a number (upstream
                # rejects anything else), in 1..200 characters of non-empty |-separated items.
                "^[A-Za-z0-9_-]{1,128}:((exists|missing)(:[^\\x00-\\x1f\\x7f-\\x9f]{0,200})?"
                "|(eq|neq):[^\\x00-\\x1f\\x7f-\\x9f]{1,200}"
                "|(gt|gte|lt|lte):-?[0-9]{1,20}(\\.[0-9]{1,20})?|in:[^\\x00-\\x1f\\x7f-\\x9f|](\\|?[^\\x00-\\x1f\\x7f-\\x9f|]){0,99})$",
                "id:op:value; `in` takes pipe-delimited values",
            ),
            _repeated("tool_names", "^[^\\x00-\\x1f\\x7f-\\x9f]{1,128}$", "tool names used during the call"),
            _query("page_size", {"type": "integer", "minimum": 1, "maximum": 100}),
            _query("summary_mode", {"type": "string", "enum": ["exclude", "include"]}),
            _query("search", {"type": "string", "pattern": "^[^\\x00-\\x1f\\x7f-\\x9f]{0,200}$"}),
        ),
        responses={
            "200": _json(
                {
                    "type": "object",
                    "required": ["conversations", "has_more"],
                    "properties": {
                        "conversations": {"type": "array", "items": {"type": "object"}},
                        "has_more": {"type": "boolean"},
                        "next_cursor": {"type": ["string", "null"]},
                    },
                }
            ),
            **_ERRORS_AUTH,
        },
        tags=("conversations",),
    ),
    ("GET", "/v1/convai/conversations/{conversation_id}"): Operation(
        summary="Get one of the caller's conversations, redacted",
        scope="convai:history",
        parameters=(_CONVERSATION_PATH,),
        responses={"200": _json({}), **_ERRORS_OWNED},  # upstream's answer, any JSON
        tags=("conversations",),
    ),
    ("GET", "/v1/convai/conversations/{conversation_id}/audio"): Operation(
        summary="Stream the audio of one of the caller's conversations",
        scope="convai:history",
        parameters=(_CONVERSATION_PATH,),
        responses={
            "200": {
                "description": "Audio, streamed",
                "content": {"audio/mpeg": {"schema": {"type": "string", "format": "binary"}}},
            },
            **_ERRORS_OWNED,
        },
        tags=("conversations",),
    ),
    ("POST", "/v1/convai/conversations/{conversation_id}/feedback"): Operation(
        summary="Like or dislike one of the caller's conversations",
        scope="convai:history",
        parameters=(_CONVERSATION_PATH,),
        request_body={
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["feedback"],
                        "properties": {"feedback": {"enum": ["like", "dislike", None]}},
                    }
                }
            },
        },
        responses={
            "200": _json({}),  # upstream's answer, any JSON ({} when it sends none)
            "408": {"$ref": "#/components/responses/RequestTimeout"},
            "413": {"$ref": "#/components/responses/PayloadTooLarge"},
            "415": {"$ref": "#/components/responses/UnsupportedMediaType"},
            **_ERRORS_OWNED,
        },
        tags=("conversations",),
    ),
    ("DELETE", "/v1/convai/conversations/{conversation_id}"): Operation(
        summary="Delete one of the caller's conversations",
        scope="convai:delete",
        parameters=(_CONVERSATION_PATH,),
        responses={"200": _json({}), **_ERRORS_OWNED},  # upstream's answer, any JSON
        tags=("conversations",),
    ),
    ("GET", "/healthz"): Operation(
        summary="Liveness: the process is up",
        responses={"200": _json({"type": "object"})},
        tags=("operations",),
    ),
    ("GET", "/readyz"): Operation(
        summary="Readiness: Redis (if configured) answers and the JWT keys are loaded",
        responses={
            "200": _json({"$ref": "#/components/schemas/Readiness"}),
            "503": _json({"$ref": "#/components/schemas/Readiness"}, "Not ready"),
        },
        tags=("operations",),
    ),
    ("GET", "/metrics"): Operation(
        summary="Prometheus metrics (text format)",
        responses={"200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}},
        tags=("operations",),
    ),
    ("GET", "/openapi.json"): Operation(
        summary="This document",
        responses={"200": _json({"type": "object"})},
        tags=("operations",),
    ),
}


def _problem_response(description: str, *codes: str) -> dict[str, Any]:
    # The `code`s a client can meet under this status (service.errors); the common Problem shape besides.
    schema = {"allOf": [PROBLEM, {"properties": {"code": {"enum": list(codes)}}}]}
    return {"description": description, "content": {"application/problem+json": {"schema": schema}}}


COMPONENTS: dict[str, Any] = {
    "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
    "schemas": {
        "Problem": {
            "type": "object",
            "required": ["type", "title", "status", "detail", "code"],
            "properties": {
                "type": {"type": "string"},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
                "code": {"type": "string"},
            },
        },
        "Readiness": {
            "type": "object",
            "required": ["status", "checks"],
            "properties": {"status": {"enum": ["ready", "not_ready"]}, "checks": {"type": "object"}},
        },
    },
    "responses": {
        "Unauthorized": _problem_response("Missing, invalid or expired token", "invalid_token"),
        "Forbidden": _problem_response(
            "Missing scope, agent not allowed, or act-as not allowed",
            "insufficient_scope",
            "agent_not_allowed",
            "act_as_not_allowed",
        ),
        "NotFound": _problem_response("No such conversation for this caller", "not_found"),
        "Invalid": _problem_response(
            "Invalid parameters or body (invalid_cursor: a cursor not issued to this caller)",
            "invalid_request",
            "invalid_cursor",
            "upstream_rejected",
        ),
        "RequestTimeout": _problem_response("The request body did not arrive in time", "request_timeout"),
        "PayloadTooLarge": _problem_response("The request body is too large", "payload_too_large"),
        "UnsupportedMediaType": _problem_response("The request body is not JSON", "unsupported_media_type"),
        "RateLimited": _problem_response(
            "Rate limited; see Retry-After", "rate_limited", "upstream_rate_limited"
        ),
        "UpstreamError": _problem_response("Upstream unreachable or failed", "upstream_error"),
        "Unavailable": _problem_response(
            "A dependency (ledger, limiter) is unavailable, or the gateway is shutting down; see Retry-After",
            "unavailable",
            "ledger_unavailable",
            "rate_limiter_unavailable",
            "audio_streams_busy",
            "shutting_down",
        ),
        "UpstreamTimeout": _problem_response("Upstream timed out", "upstream_timeout"),
    },
}


class UndocumentedRoute(Exception):
    """A mounted route has no OPERATIONS entry, or an entry names no mounted route."""


def _mounted(routes: Sequence[BaseRoute]) -> set[tuple[str, str]]:
    found = set()
    for route in routes:
        if isinstance(route, Route):
            for method in route.methods or ():
                if method != "HEAD":
                    found.add((method, route.path))
    return found


def build_document(routes: Sequence[BaseRoute], *, version: str) -> dict[str, Any]:
    """Build the OpenAPI 3.1 document for `routes`, or raise UndocumentedRoute."""
    mounted = _mounted(routes)
    missing = mounted - OPERATIONS.keys()
    if missing:
        raise UndocumentedRoute(f"routes without an OpenAPI entry: {sorted(missing)}")
    paths: dict[str, dict[str, Any]] = {}
    for method, path in sorted(mounted, key=lambda item: (item[1], item[0])):
        op = OPERATIONS[(method, path)]
        entry: dict[str, Any] = {
            "operationId": f"{method.lower()}_{path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}".replace(
                "-", "_"
            ).replace(".", "_"),
            "summary": op.summary,
            "tags": list(op.tags),
            "parameters": list(op.parameters),
            "responses": op.responses,
        }
        if op.scope is not None:
            entry["security"] = [{"bearer": []}]
            entry["description"] = f"Requires scope `{op.scope}`."
            entry["x-required-scope"] = op.scope
        if op.request_body is not None:
            entry["requestBody"] = op.request_body
        paths.setdefault(path, {})[method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "convai-gateway",
            "version": version,
            "description": "Backend-for-frontend for the ElevenLabs Conversational AI API.",
        },
        "paths": paths,
        "components": COMPONENTS,
    }

"""Injected upstream failures: parsed from the control API or a request header, and turned into responses."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

ENDPOINTS = frozenset({"list", "get", "audio", "feedback", "delete", "get_signed_url", "token", "*"})
KINDS = frozenset({"status", "slow", "malformed_json", "drop", "rate_limit"})
FAULT_HEADER = "x-emulator-fault"


@dataclass
class Fault:
    """One failure to inject into the next `times` matching upstream requests."""

    endpoint: str = "*"
    kind: str = "status"
    status: int = 503
    delay_seconds: float = 1.0
    retry_after: int = 1
    times: int = 1

    def matches(self, endpoint: str) -> bool:
        """Tell whether this fault applies to requests of `endpoint`."""
        return self.endpoint in ("*", endpoint)

    def as_json(self) -> dict[str, Any]:
        """Return this fault as the JSON the control API accepts."""
        return {
            "endpoint": self.endpoint,
            "kind": self.kind,
            "status": self.status,
            "delay_seconds": self.delay_seconds,
            "retry_after": self.retry_after,
            "times": self.times,
        }

    async def delay(self) -> None:
        """Sleep for a `slow` fault; do nothing for the other kinds."""
        if self.kind == "slow":
            await asyncio.sleep(self.delay_seconds)

    def response(self) -> Response | None:
        """Return the response that replaces the real one, or None when the request proceeds (slow)."""
        if self.kind == "status":
            return JSONResponse(
                {
                    "detail": {
                        "status": "emulated_fault",
                        "message": f"Emulated upstream failure ({self.status}).",
                    }
                },
                status_code=self.status,
            )
        if self.kind == "rate_limit":
            return JSONResponse(
                {"detail": {"status": "too_many_concurrent_requests", "message": "Emulated rate limit."}},
                status_code=429,
                headers={"Retry-After": str(self.retry_after)},
            )
        if self.kind == "malformed_json":
            return Response(b'{"conversations": [{"agent_id": ', media_type="application/json")
        if self.kind == "drop":
            return DroppedResponse()
        return None


class DroppedResponse(Response):
    """A response that announces a body, sends part of it and stops: the server then closes the connection."""

    def __init__(self) -> None:
        super().__init__(status_code=200, media_type="application/json")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the response start and a truncated body, leaving the response incomplete."""
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"partial": ', "more_body": True})
        # Returning without completing makes uvicorn close the socket, so clients see a transport error.


def parse_fault(data: Any) -> Fault:
    """Build a Fault from control-API JSON; raise ValueError naming the bad field."""
    if not isinstance(data, Mapping):
        raise ValueError("fault must be a JSON object")
    unknown = sorted(set(data) - {"endpoint", "kind", "status", "delay_seconds", "retry_after", "times"})
    if unknown:
        raise ValueError(f"unknown fault fields: {', '.join(unknown)}")
    fault = Fault()
    endpoint = data.get("endpoint", "*")
    if endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint must be one of {', '.join(sorted(ENDPOINTS))}")
    kind = data.get("kind", "status")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(sorted(KINDS))}")
    fault.endpoint, fault.kind = endpoint, kind
    fault.status = _number(data, "status", integer=True, default=fault.status, low=100, high=599)
    fault.delay_seconds = float(
        _number(data, "delay_seconds", integer=False, default=fault.delay_seconds, low=0, high=600)
    )
    fault.retry_after = _number(
        data, "retry_after", integer=True, default=fault.retry_after, low=0, high=86400
    )
    fault.times = _number(data, "times", integer=True, default=fault.times, low=1, high=1_000_000)
    return fault


def parse_fault_header(value: str) -> Fault:
    """Build a one-shot Fault from `X-Emulator-Fault: kind=status;status=503`; raise ValueError when invalid."""
    fields: dict[str, Any] = {}
    for part in value.split(";"):
        name, sep, raw = part.strip().partition("=")
        if not sep:
            raise ValueError(f"fault header part {part.strip()!r} is not name=value")
        try:
            fields[name.strip()] = json.loads(raw.strip())
        except json.JSONDecodeError:
            fields[name.strip()] = raw.strip()
    return parse_fault(fields)


def _number(
    data: Mapping[str, Any], key: str, *, integer: bool, default: float, low: float, high: float
) -> Any:
    value = data.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (integer and not isinstance(value, int))
    ):
        raise ValueError(f"{key} must be {'an integer' if integer else 'a number'}")
    if not low <= value <= high:
        raise ValueError(f"{key} must be between {low:g} and {high:g}")
    return value

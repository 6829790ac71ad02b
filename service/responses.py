"""The JSON answer of the API routes: Starlette's JSONResponse, rendered by an encoder built once."""

from __future__ import annotations

from typing import Any, Final, NoReturn

from starlette.responses import JSONResponse

from service.compact_json import compact_encoder


def _not_json(value: Any) -> NoReturn:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# What JSONResponse.render's json.dumps(ensure_ascii=False, allow_nan=False, separators=(",", ":")) runs.
_encode: Final = compact_encoder(_not_json, allow_nan=False)


class JsonAnswer(JSONResponse):
    """A JSONResponse that renders the same bytes without building an encoder per answer."""

    def render(self, content: Any) -> bytes:
        """Return `content` as compact UTF-8 JSON; NaN and infinities raise ValueError."""
        return "".join(_encode(content, 0)).encode()

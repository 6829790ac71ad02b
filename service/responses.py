"""The JSON answer of the API routes: Starlette's JSONResponse, rendered by an encoder built once."""

from __future__ import annotations

from _json import encode_basestring, make_encoder
from typing import Any, Final, NoReturn

from starlette.responses import JSONResponse


def _not_json(value: Any) -> NoReturn:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# What JSONResponse.render's json.dumps(ensure_ascii=False, allow_nan=False, separators=(",", ":")) runs,
# built once instead of per answer (json.dumps with options builds a JSONEncoder, whose encode builds this).
# No circular-reference check (markers None): answers are parsed upstream JSON and the gateway's own dicts.
_encode: Final = make_encoder(None, _not_json, encode_basestring, None, ":", ",", False, False, False)


class JsonAnswer(JSONResponse):
    """A JSONResponse that renders the same bytes without building an encoder per answer."""

    def render(self, content: Any) -> bytes:
        """Return `content` as compact UTF-8 JSON; NaN and infinities raise ValueError."""
        return "".join(_encode(content, 0)).encode()

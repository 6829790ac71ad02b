"""Pagination cursors bound to the caller.

The upstream `next_cursor` of a user's list would page through *that user's* filter on a later call only
because the gateway forces `user_id`; still, a cursor handed to one user must be worthless to another, and
the client must not be able to edit it. The gateway therefore hands out

    base64url(json {"u": <user tag>, "c": <upstream cursor>}) "." base64url(HMAC-SHA256(key, payload))

where `key = SHA-256("convai-gateway cursor v1" || xi-api-key)` (so rotating the key invalidates old
cursors, and no new secret needs configuring) and the user tag is an HMAC of the user id under the same key.
The upstream cursor is visible but cannot be altered or replayed by another user.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import re

from service.errors import InvalidRequest, UpstreamError

logger = logging.getLogger("service.cursors")

KEY_CONTEXT = b"convai-gateway cursor v1"
# Sealing adds ~580 characters to upstream's cursor (whose length the reference does not bound): room for
# an upstream cursor of ~5.6 KB; a longer one is refused when sealed (502), never handed out dead.
MAX_CURSOR_LENGTH = 8192
_USER_TAG_BYTES = 16
_B64URL = re.compile(r"[A-Za-z0-9_-]+")


class InvalidCursor(InvalidRequest):
    """The cursor was not issued by this gateway to this caller, or was altered."""

    code = "invalid_cursor"

    def __init__(self) -> None:
        super().__init__("cursor is not valid for this caller", extra={"parameter": "cursor"})


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class CursorSealer:
    """Seal upstream cursors to a caller, and open them again for that caller only."""

    __slots__ = ("_key",)

    def __init__(self, api_key: str) -> None:
        self._key = hashlib.sha256(KEY_CONTEXT + api_key.encode("utf-8")).digest()

    def _user_tag(self, user_id: str) -> str:
        mac = hmac.new(self._key, b"user\x00" + user_id.encode("utf-8"), hashlib.sha256).digest()
        return _b64encode(mac[:_USER_TAG_BYTES])

    def _mac(self, payload: str) -> bytes:
        return hmac.new(self._key, b"cursor\x00" + payload.encode("ascii"), hashlib.sha256).digest()

    def seal(self, user_id: str, upstream_cursor: str) -> str:
        """Return the client cursor wrapping `upstream_cursor` for `user_id`."""
        body = json.dumps({"u": self._user_tag(user_id), "c": upstream_cursor}, separators=(",", ":"))
        payload = _b64encode(body.encode("utf-8"))
        sealed = f"{payload}.{_b64encode(self._mac(payload))}"
        if len(sealed) > MAX_CURSOR_LENGTH:
            # Handed out, the client could never use it: open() refuses anything this long.
            raise UpstreamError("upstream returned a cursor too long to hand on")
        return sealed

    def open(self, user_id: str, cursor: str) -> str:
        """Return the upstream cursor inside `cursor`, or raise InvalidCursor if it is not this caller's."""
        if len(cursor) > MAX_CURSOR_LENGTH or not cursor.isascii():
            raise InvalidCursor()
        payload, dot, mac_text = cursor.partition(".")
        if not dot or not _B64URL.fullmatch(payload) or not _B64URL.fullmatch(mac_text):
            raise InvalidCursor()
        # The MAC is checked before the payload is parsed: a forged cursor never reaches the JSON parser
        # (whose nesting depth a crafted payload could exhaust).
        try:
            mac = _b64decode(mac_text)
        except (binascii.Error, ValueError) as exc:
            raise InvalidCursor() from exc
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise InvalidCursor()
        try:
            body = json.loads(_b64decode(payload))
        except (binascii.Error, ValueError, RecursionError) as exc:
            raise InvalidCursor() from exc
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("c"), str)
            or not isinstance(body.get("u"), str)
        ):
            raise InvalidCursor()
        if not hmac.compare_digest(body["u"], self._user_tag(user_id)):
            logger.info("cursor of another caller refused")
            raise InvalidCursor()
        upstream: str = body["c"]
        return upstream

"""Input validation shared by the routes: identifiers and strict query-string parsing."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl

from service.errors import InvalidRequest

# Upstream ids are ASCII letters, digits, `_` and `-` (e.g. `conv_01j...`, `agent_7a...`). Anything else
# (`/`, `%`, `.`, `?`, `#`, whitespace, unicode) could change the upstream URL, so it never gets near one.
_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")
MAX_ID_LENGTH = 128
# The C0 and C1 control characters and DEL (Unicode category Cc): never part of free text. Every other character
# is, spaces included: str.isprintable() also refuses U+00A0, U+3000 and U+200D (pasted text, Japanese input,
# emoji sequences).
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def is_valid_id(value: str) -> bool:
    """Tell whether `value` is a well-formed upstream identifier."""
    return _ID_PATTERN.fullmatch(value) is not None


def is_text(value: str) -> bool:
    """Tell whether `value` is free text: no control characters."""
    return _CONTROL_CHARACTER.search(value) is None


def conversation_id(value: str) -> str:
    """Return `value` if it is a well-formed conversation id, else raise InvalidRequest."""
    if not is_valid_id(value):
        raise InvalidRequest(
            f"conversation_id must be 1..{MAX_ID_LENGTH} characters of A-Z a-z 0-9 _ -",
            extra={"parameter": "conversation_id"},
        )
    return value


def agent_id(value: str | None) -> str:
    """Return `value` if it is a well-formed agent id, else raise InvalidRequest."""
    if value is None or value == "":
        raise InvalidRequest("agent_id is required", extra={"parameter": "agent_id"})
    if not is_valid_id(value):
        raise InvalidRequest(
            f"agent_id must be 1..{MAX_ID_LENGTH} characters of A-Z a-z 0-9 _ -",
            extra={"parameter": "agent_id"},
        )
    return value


def query_params(query_string: bytes) -> list[tuple[str, str]]:
    """Parse a raw query string whose names and values must be UTF-8 into pairs, else raise InvalidRequest."""
    # Starlette decodes with errors="replace": `search=%FF` would reach upstream as U+FFFD, a value the client
    # never sent.
    try:
        return query_pairs(query_string.decode("utf-8"), errors="strict")
    except UnicodeDecodeError as exc:
        raise InvalidRequest("query parameters must be percent-encoded UTF-8") from exc


def query_pairs(query: str, *, errors: str = "replace") -> list[tuple[str, str]]:
    """Split a query string into (name, value) pairs, blank values kept, as `parse_qsl` does."""
    if "%" in query or "+" in query:
        return parse_qsl(query, keep_blank_values=True, errors=errors)
    # Nothing to unquote: parse_qsl's own split, without its three calls per pair.
    return [(name, value) for name, _, value in (pair.partition("=") for pair in query.split("&") if pair)]


def strict_query(
    params: Iterable[tuple[str, str]],
    *,
    single: Iterable[str] = (),
    repeated: Iterable[str] = (),
    ignored: Iterable[str] = (),
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Split query params into single and repeated values; unknown or duplicated single names are a 422."""
    single_names, repeated_names, ignored_names = set(single), set(repeated), set(ignored)
    singles: dict[str, str] = {}
    multiples: dict[str, list[str]] = {name: [] for name in repeated_names}
    for name, value in params:
        if name in ignored_names:
            continue
        if name in repeated_names:
            multiples[name].append(value)
        elif name in single_names:
            if name in singles:
                raise InvalidRequest(f"parameter {name} given more than once", extra={"parameter": name})
            singles[name] = value
        else:
            raise InvalidRequest(
                f"unknown parameter {_printable(name)}", extra={"parameter": _printable(name)}
            )
    return singles, multiples


def integer(singles: Mapping[str, str], name: str, *, low: int, high: int) -> int | None:
    """Parse an optional integer parameter within [low, high], else raise InvalidRequest."""
    raw = singles.get(name)
    if raw is None:
        return None
    if not re.fullmatch(r"-?[0-9]{1,19}", raw):
        raise InvalidRequest(f"{name} must be an integer", extra={"parameter": name})
    value = int(raw)
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}", extra={"parameter": name})
    return value


def boolean(singles: Mapping[str, str], name: str) -> bool | None:
    """Parse an optional boolean parameter (`true`/`false`), else raise InvalidRequest."""
    raw = singles.get(name)
    if raw is None:
        return None
    if raw not in ("true", "false"):
        raise InvalidRequest(f"{name} must be true or false", extra={"parameter": name})
    return raw == "true"


def choice(singles: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str | None:
    """Parse an optional parameter that must be one of `choices`, else raise InvalidRequest."""
    raw = singles.get(name)
    if raw is None:
        return None
    if raw not in choices:
        raise InvalidRequest(f"{name} must be one of {', '.join(choices)}", extra={"parameter": name})
    return raw


def _printable(name: str) -> str:
    # Parameter names are attacker-chosen; echo a short, printable form only.
    cleaned = "".join(ch if ch.isprintable() and ch.isascii() else "?" for ch in name[:40])
    return cleaned + ("..." if len(name) > 40 else "")

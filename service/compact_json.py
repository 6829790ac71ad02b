"""Compact JSON encoders built once: orjson for the plain types, CPython's C encoder for everything else."""

from __future__ import annotations

from _json import encode_basestring, make_encoder
from collections.abc import Callable, Sequence
from typing import Any, Final

import orjson

# orjson renders only what CPython's encoder renders the same way; the rest raises orjson.JSONEncodeError
# and the caller falls back to that encoder: subclasses of str, int, dict and list, dataclasses and
# datetimes (passed through to a default that is not there), integers beyond 64 bits, keys that are not
# strings, lone surrogates, nesting deeper than 254. What still differs: NaN and the infinities become null
# (callers keep them out), a small float's exponent has no leading zero (1e-7, not 1e-07: the same number to
# any JSON parser), and a UUID or a plain Enum is rendered where CPython's encoder would call its default.
_PLAIN_TYPES_ONLY: Final = (
    orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_SUBCLASS
)

NotPlainJson = orjson.JSONEncodeError


def plain_json(value: Any) -> bytes:
    """Return `value` as compact UTF-8 JSON (non-ASCII kept); raise NotPlainJson for what orjson leaves out."""
    return orjson.dumps(value, option=_PLAIN_TYPES_ONLY)


def compact_encoder(default: Callable[[Any], Any], *, allow_nan: bool) -> Callable[[Any, int], Sequence[str]]:
    """Return the C encoder of compact JSON (`,`/`:` separators, non-ASCII kept): `"".join(encode(value, 0))`."""
    # What json.dumps(ensure_ascii=False, separators=(",", ":"), ...) runs, built once instead of per call:
    # json.dumps with options builds a JSONEncoder, whose encode builds this C encoder (~7 k instructions).
    # Returned bare: a Python wrapper doing the join cost +0.3 % of a gateway request (one more frame per line).
    # No circular-reference check (markers None): the values are log fields, parsed upstream JSON and the
    # gateway's own dicts, and the check's dict would keep stale entries after an encode that raised.
    # Arguments: markers, default, encoder, indent, key and item separators, sort_keys, skipkeys, allow_nan.
    encoder: Callable[[Any, int], Sequence[str]] = make_encoder(
        None, default, encode_basestring, None, ":", ",", False, False, allow_nan
    )
    return encoder

"""Caller-bound pagination cursors: round trip for the caller, refused for anyone or anything else."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.cursors import MAX_CURSOR_LENGTH, CursorSealer, InvalidCursor
from service.errors import InvalidRequest, UpstreamError, error_response

API_KEY = "xi-test-key-0123456789abcdef"


def test_cursor_round_trips_for_its_caller() -> None:
    sealer = CursorSealer(API_KEY)
    sealed = sealer.seal("alice", "upstream-cursor-42")
    assert sealer.open("alice", sealed) == "upstream-cursor-42"


def test_cursor_does_not_contain_the_user_id_or_the_api_key() -> None:
    sealed = CursorSealer(API_KEY).seal("alice@example.com", "c1")
    payload = base64.urlsafe_b64decode(sealed.split(".")[0] + "==")
    assert b"alice" not in payload
    assert API_KEY not in sealed


def test_cursor_of_one_user_is_refused_for_another() -> None:
    sealer = CursorSealer(API_KEY)
    sealed = sealer.seal("alice", "c1")
    with pytest.raises(InvalidCursor) as caught:
        sealer.open("bob", sealed)
    assert caught.value.status == 422
    assert caught.value.code == "invalid_cursor"
    assert isinstance(caught.value, InvalidRequest)
    body = json.loads(bytes(error_response(caught.value).body))
    assert body["code"] == "invalid_cursor" and "c1" not in json.dumps(body)


def test_cursor_sealed_with_another_api_key_is_refused() -> None:
    sealed = CursorSealer("another-key").seal("alice", "c1")
    with pytest.raises(InvalidCursor):
        CursorSealer(API_KEY).open("alice", sealed)


def test_cursor_with_an_edited_upstream_cursor_is_refused() -> None:
    sealer = CursorSealer(API_KEY)
    _, mac = sealer.seal("alice", "c1").split(".")
    forged_body = json.dumps({"u": "x", "c": "c2"}).encode()
    forged = base64.urlsafe_b64encode(forged_body).rstrip(b"=").decode() + "." + mac
    with pytest.raises(InvalidCursor):
        sealer.open("alice", forged)


def test_cursor_reusing_another_users_payload_with_own_mac_fails() -> None:
    sealer = CursorSealer(API_KEY)
    alice_payload, _ = sealer.seal("alice", "c1").split(".")
    _, bob_mac = sealer.seal("bob", "c1").split(".")
    with pytest.raises(InvalidCursor):
        sealer.open("bob", f"{alice_payload}.{bob_mac}")


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        ".",
        "abc",
        "abc.",
        ".abc",
        "a.b.c",
        "!!!.???",
        "é.é",
        "x" * (MAX_CURSOR_LENGTH + 1),
        "eyJ1IjoieCJ9.AAAA",
        "bm90IGpzb24.AAAA",
    ],
)
def test_malformed_cursors_are_refused(garbage: str) -> None:
    with pytest.raises(InvalidCursor):
        CursorSealer(API_KEY).open("alice", garbage)


def test_forged_cursor_is_refused_before_its_payload_is_parsed() -> None:
    # 1,400 nested arrays exhaust json's recursion limit: the MAC check must come first.
    deep = base64.urlsafe_b64encode(b"[" * 1400).rstrip(b"=").decode()
    forged = f"{deep}.{'A' * 43}"
    assert len(forged) <= MAX_CURSOR_LENGTH
    with pytest.raises(InvalidCursor):
        CursorSealer(API_KEY).open("alice", forged)


def test_mac_with_extra_characters_is_refused() -> None:
    sealer = CursorSealer(API_KEY)
    sealed = sealer.seal("alice", "c1")
    with pytest.raises(InvalidCursor):
        sealer.open("alice", sealed + "=")


@settings(max_examples=200, deadline=None)
@given(
    upstream=st.text(max_size=300),
    user=st.text(min_size=1, max_size=60),
    other=st.text(min_size=1, max_size=60),
)
def test_any_cursor_round_trips_and_binds_to_its_user(upstream: str, user: str, other: str) -> None:
    sealer = CursorSealer(API_KEY)
    sealed = sealer.seal(user, upstream)
    assert sealed.isascii() and sealed.isprintable()
    assert sealer.open(user, sealed) == upstream
    if other != user:
        with pytest.raises(InvalidCursor):
            sealer.open(other, sealed)


def test_a_cursor_too_long_to_open_is_never_sealed() -> None:
    sealer = CursorSealer(API_KEY)
    longest = sealer.seal("alice", "c" * 5_500)
    assert len(longest) <= MAX_CURSOR_LENGTH
    assert sealer.open("alice", longest) == "c" * 5_500
    with pytest.raises(UpstreamError, match="cursor too long"):
        sealer.seal("alice", "c" * 6_500)

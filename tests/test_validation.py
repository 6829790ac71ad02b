"""Validation: ids never carry URL syntax; query strings are parsed strictly."""

from __future__ import annotations

import pytest

from service import validation
from service.errors import InvalidRequest


@pytest.mark.parametrize("value", ["conv_01jabc", "agent-7", "A_b-9", "x" * 128])
def test_well_formed_ids_pass(value: str) -> None:
    assert validation.conversation_id(value) == value


@pytest.mark.parametrize(
    "value",
    ["", "../x", "..%2Fx", "a/b", "a%2Fb", "a?b=c", "a#b", "a b", "é", "a\r\nb", "x" * 129, "a.b", "%2e%2e"],
)
def test_ids_with_url_syntax_are_refused(value: str) -> None:
    with pytest.raises(InvalidRequest):
        validation.conversation_id(value)


def test_unknown_parameter_is_refused_with_a_printable_name() -> None:
    with pytest.raises(InvalidRequest) as caught:
        validation.strict_query(validation.query_params(b"agent_id=a&evil%0d%0a=1"), single=["agent_id"])
    assert "\r" not in caught.value.detail and "\n" not in caught.value.detail


def test_duplicate_single_parameter_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="more than once"):
        validation.strict_query(validation.query_params(b"agent_id=a&agent_id=b"), single=["agent_id"])


def test_repeated_and_ignored_parameters_are_split() -> None:
    singles, repeated = validation.strict_query(
        validation.query_params(b"a=1&t=x&t=y&skip=z"), single=["a"], repeated=["t"], ignored=["skip"]
    )
    assert singles == {"a": "1"}
    assert repeated == {"t": ["x", "y"]}


@pytest.mark.parametrize(
    ("raw", "ok"), [("5", True), ("0", False), ("101", False), ("1e3", False), ("x", False)]
)
def test_integers_out_of_bounds_or_not_plain_decimals_are_refused(raw: str, ok: bool) -> None:
    if ok:
        assert validation.integer({"n": raw}, "n", low=1, high=100) == int(raw)
    else:
        with pytest.raises(InvalidRequest):
            validation.integer({"n": raw}, "n", low=1, high=100)


def test_only_literal_booleans_and_listed_choices_are_accepted() -> None:
    assert validation.boolean({"b": "true"}, "b") is True
    assert validation.boolean({}, "b") is None
    with pytest.raises(InvalidRequest):
        validation.boolean({"b": "1"}, "b")
    assert validation.choice({"c": "x"}, "c", ("x", "y")) == "x"
    with pytest.raises(InvalidRequest):
        validation.choice({"c": "z"}, "c", ("x", "y"))

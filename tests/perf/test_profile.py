"""The profile summary: collapsed py-spy stacks folded into per-function shares."""

from __future__ import annotations

from tests.perf.profile import summarize

STACKS = """\
main (app.py:10);handle (app.py:20);redis_call (redis.py:5) 6
main (app.py:10);handle (app.py:21);redis_call (redis.py:7) 2
main (app.py:10);recurse (app.py:30);recurse (app.py:31) 2
"""


def test_summary_folds_line_numbers_into_one_frame_per_function() -> None:
    lines = summarize(STACKS).splitlines()
    assert lines[0] == "10 samples"
    exclusive = lines[lines.index("-- exclusive") + 1 :]
    assert exclusive[0] == "  80.0%  redis_call (redis.py)"
    assert "  20.0%  recurse (app.py)" in exclusive


def test_summary_counts_a_recursive_frame_once_per_sample() -> None:
    lines = summarize(STACKS).splitlines()
    inclusive = lines[lines.index("-- inclusive") + 1 : lines.index("-- exclusive")]
    assert inclusive[0] == " 100.0%  main (app.py)"
    assert "  20.0%  recurse (app.py)" in inclusive
    assert "  80.0%  handle (app.py)" in inclusive


def test_summary_of_no_samples_says_so() -> None:
    assert summarize("") == "no samples"

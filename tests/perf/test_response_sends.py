"""The response-sends comparison: both modes deliver every byte, and the command prints one median per mode."""

from __future__ import annotations

import pytest

from tests.perf.response_sends import MODES, compare, main


def test_each_mode_gets_one_figure_per_round() -> None:
    figures = compare(responses=50, rounds=3)
    assert set(figures) == set(MODES)
    assert all(len(values) == 3 and all(value > 0 for value in values) for values in figures.values())


def test_the_command_prints_a_median_per_mode_and_their_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--responses", "50", "--rounds", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:2]] == list(MODES)
    assert lines[2].startswith("one send / two sends: ")


def test_no_responses_is_refused() -> None:
    with pytest.raises(SystemExit):
        main(["--responses", "0"])

"""The command-line progress bar: what it draws, how often, and the time it says is left."""

from __future__ import annotations

import io

import pytest

from modules.progress import ProgressBar, format_duration


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (17.4, "17s"), (245, "4m05s"), (3720, "1h02m"), (-3, "0s")])
def test_durations_are_short(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_the_time_left_counts_the_work_queued_after_this_phase() -> None:
    clock = FakeClock()
    bar = ProgressBar("epoch 1/3", 100, later=200, clock=clock, stream=io.StringIO())
    clock.now += 50.0
    line = bar.line(25, "loss 0.5")
    # 2 s a step, 75 steps left in this epoch and 200 in the next two.
    assert line.startswith("epoch 1/3 [########......................] 25/100  loss 0.5")
    assert line.endswith("2.00 s/it  ETA 9m10s")


def test_a_fast_phase_shows_a_rate_and_its_total_time_at_the_end() -> None:
    clock = FakeClock()
    bar = ProgressBar("encoding", 1000, clock=clock, stream=io.StringIO())
    clock.now += 4.0
    assert bar.line(500).endswith("125.0 it/s  ETA 4s")
    clock.now += 4.0
    assert bar.line(1000).endswith("125.0 it/s  took 8s")


def test_it_redraws_about_fifty_times_and_ends_the_line_once() -> None:
    out = io.StringIO()
    bar = ProgressBar("rows", 1000, clock=FakeClock(), stream=out)
    for done in range(1, 1001):
        bar.update(done)
    text = out.getvalue()
    assert text.count("\r") == 50
    assert text.endswith("\n") and text.count("\n") == 1


def test_steps_of_many_units_still_redraw_regularly() -> None:
    out = io.StringIO()
    bar = ProgressBar("rows", 15100, clock=FakeClock(), stream=out)
    for done in [*range(64, 15100, 64), 15100]:
        bar.update(done)
    # 15100 / 50 = 302 is never a multiple of 64: every crossing of a 302-row mark draws.
    assert 45 <= out.getvalue().count("\r") <= 51


def test_a_disabled_bar_writes_nothing() -> None:
    out = io.StringIO()
    bar = ProgressBar("rows", 10, enabled=False, stream=out)
    for done in range(11):
        bar.update(done)
    assert out.getvalue() == ""

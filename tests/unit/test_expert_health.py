"""Cool-down bookkeeping, alone and inside the runner (scripted backends, a hand-driven clock)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest

from modules.chat_types import ChatEvent, ChatRequest
from modules.errors import ExpertUnavailable, ServiceUnavailable
from modules.expert_health import ExpertHealth
from modules.expert_runner import ExpertRunner
from tests.unit.test_expert_runner import CODER, CONFIG, FALLBACK, REQUEST, ScriptedBackend, answer, fail, text_of


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def health(threshold: int = 3, cooldown: float = 30.0) -> tuple[ExpertHealth, Clock]:
    clock = Clock()
    return ExpertHealth(threshold, cooldown, clock=clock), clock


def test_failures_below_the_threshold_do_not_bench() -> None:
    h, _ = health()
    h.record_failure("coder", "boom")
    h.record_failure("coder", "boom")
    assert not h.is_benched("coder") and h.failures("coder") == 2


def test_threshold_failures_in_a_row_bench_until_the_cool_down_ends(caplog: pytest.LogCaptureFixture) -> None:
    h, clock = health()
    with caplog.at_level(logging.INFO, logger="lemoe"):
        for _ in range(3):
            h.record_failure("coder", "ExpertTimeout: slow")
        assert h.is_benched("coder")
        clock.now += 29.9
        assert h.is_benched("coder")
        clock.now += 0.2
        assert not h.is_benched("coder")
    assert "expert 'coder' benched for 30s after 3 failures in a row (last: ExpertTimeout: slow)" in caplog.text
    assert "expert 'coder' cool-down is over" in caplog.text


def test_a_success_clears_the_record() -> None:
    h, _ = health()
    h.record_failure("coder", "x")
    h.record_failure("coder", "x")
    h.record_success("coder")
    h.record_failure("coder", "x")
    assert h.failures("coder") == 1 and not h.is_benched("coder")


def test_one_failure_after_the_cool_down_benches_again_at_once() -> None:
    h, clock = health(threshold=2, cooldown=10)
    h.record_failure("coder", "x")
    h.record_failure("coder", "x")
    clock.now += 11
    assert not h.is_benched("coder")
    h.record_failure("coder", "x")
    assert h.is_benched("coder")


def test_zero_cool_down_never_benches() -> None:
    h, _ = health(threshold=1, cooldown=0)
    for _ in range(5):
        h.record_failure("coder", "x")
    assert not h.is_benched("coder")


def test_experts_are_counted_apart() -> None:
    h, _ = health(threshold=1)
    h.record_failure("coder", "x")
    assert h.is_benched("coder") and not h.is_benched("writer")


# --- inside the runner ------------------------------------------------------------------------

def runner_with(coder_script: Callable[[ChatRequest], Iterator[ChatEvent]], threshold: int = 2,
                cooldown: float = 60) -> tuple[ExpertRunner, ScriptedBackend, ScriptedBackend, Clock]:
    clock = Clock()
    fb, coder = ScriptedBackend(answer("fallback here")), ScriptedBackend(coder_script)
    runner = ExpertRunner(CONFIG, {0: fb, 1: coder}, ExpertHealth(threshold, cooldown, clock=clock))
    return runner, fb, coder, clock


def test_benched_expert_is_skipped_straight_to_the_fallback(caplog: pytest.LogCaptureFixture) -> None:
    runner, fb, coder, _ = runner_with(fail(ExpertUnavailable("refused")))
    for _ in range(2):
        assert runner.start(CODER, REQUEST).expert is FALLBACK
    assert coder.calls == 2
    with caplog.at_level(logging.INFO, logger="lemoe"):
        run = runner.start(CODER, REQUEST)
        expert, events, cause = runner.collect(CODER, REQUEST)
    assert run.expert is FALLBACK and run.fallback_cause == "in cool-down"
    assert expert is FALLBACK and cause == "in cool-down" and text_of(events).strip() == "fallback here"
    assert coder.calls == 2, "a benched expert must not be tried"
    assert "[Auto-Correction] expert 'coder' is in cool-down; answering with fallback 'fallback'" in caplog.text


def test_expert_is_tried_again_when_its_cool_down_ends() -> None:
    outcomes = iter([ExpertUnavailable("down"), ExpertUnavailable("down"), None])

    def script(request: ChatRequest) -> Iterator[ChatEvent]:
        outcome = next(outcomes)
        if outcome is not None:
            raise outcome
        yield from answer("coder is back")(request)

    runner, _, coder, clock = runner_with(script)
    runner.collect(CODER, REQUEST)
    runner.collect(CODER, REQUEST)
    assert runner.collect(CODER, REQUEST)[0] is FALLBACK and coder.calls == 2
    clock.now += 61
    expert, events, cause = runner.collect(CODER, REQUEST)
    assert expert is CODER and cause is None and text_of(events).strip() == "coder is back"


def test_mid_stream_failures_count_too() -> None:
    runner, _, coder, _ = runner_with(fail(ExpertUnavailable("cut"), after=2))
    for _ in range(2):
        run = runner.start(CODER, REQUEST)
        assert run.expert is CODER
        with pytest.raises(ExpertUnavailable):
            list(run.events)
    assert runner.start(CODER, REQUEST).expert is FALLBACK and coder.calls == 2


def test_a_client_going_away_is_not_a_failure() -> None:
    runner, _, coder, _ = runner_with(answer("a b c d e f"), threshold=1)
    for _ in range(3):
        run = runner.start(CODER, REQUEST)
        next(run.events)
        run.close()
    assert runner.start(CODER, REQUEST).expert is CODER and coder.calls == 4


def test_the_fallback_is_never_benched() -> None:
    clock = Clock()
    fb = ScriptedBackend(fail(ExpertUnavailable("fallback down")))
    runner = ExpertRunner(CONFIG, {0: fb, 1: ScriptedBackend(answer("x"))}, ExpertHealth(1, 60, clock=clock))
    for _ in range(3):
        with pytest.raises(ServiceUnavailable):
            runner.collect(FALLBACK, REQUEST)
    assert fb.calls == 3


def test_runner_takes_its_thresholds_from_the_server_config() -> None:
    fb, coder = ScriptedBackend(answer("fb")), ScriptedBackend(fail(ExpertUnavailable("down")))
    runner = ExpertRunner(CONFIG, {0: fb, 1: coder})
    for _ in range(CONFIG.server.expert_failures_before_cooldown + 2):
        runner.collect(CODER, REQUEST)
    assert coder.calls == CONFIG.server.expert_failures_before_cooldown

"""The runner's failure semantics, with scripted backends (like httpx's MockTransport)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from modules.chat_types import ChatEvent, ChatRequest, Done, Message, TextDelta
from modules.config_manager import AppConfig, ExpertConfig, LocalModelsConfig, RouterConfig, ServerConfig
from modules.errors import ExpertStreamBroken, ExpertTimeout, ExpertUnavailable, InvalidRequest, ServiceUnavailable
from modules.expert_runner import ExpertRunner


class ScriptedBackend:
    def __init__(self, script: Callable[[ChatRequest], Iterator[ChatEvent]]) -> None:
        self.script = script
        self.calls = 0
        self.closed_streams = 0

    def stream_chat(self, request: ChatRequest) -> Iterator[ChatEvent]:
        self.calls += 1
        try:
            yield from self.script(request)
        finally:
            self.closed_streams += 1

    def close(self) -> None:
        pass


def answer(text: str) -> Callable[[ChatRequest], Iterator[ChatEvent]]:
    def script(request: ChatRequest) -> Iterator[ChatEvent]:
        for word in text.split(" "):
            yield TextDelta(word + " ")
        yield Done()
    return script


def fail(exc: Exception, after: int = 0) -> Callable[[ChatRequest], Iterator[ChatEvent]]:
    def script(request: ChatRequest) -> Iterator[ChatEvent]:
        for i in range(after):
            yield TextDelta(f"t{i} ")
        raise exc
    return script


def expert(i: int, label: str) -> ExpertConfig:
    return ExpertConfig(id=i, label=label, type="ollama", url="http://127.0.0.1:1", model_name="m")


CONFIG = AppConfig(
    server=ServerConfig(), router=RouterConfig(), local_models=LocalModelsConfig(),
    experts=(expert(0, "fallback"), expert(1, "coder")),
    project_dir=Path("."), config_path=Path("c.json"), experts_path=Path("e.json"),
)
FALLBACK, CODER = CONFIG.experts
REQUEST = ChatRequest(model=None, messages=[Message(role="user", content="hi")], stream=True)


def runner(fallback: ScriptedBackend, coder: ScriptedBackend) -> ExpertRunner:
    return ExpertRunner(CONFIG, {0: fallback, 1: coder})


def text_of(events: list[ChatEvent] | Iterator[ChatEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def test_healthy_expert_answers_itself() -> None:
    fb, coder = ScriptedBackend(answer("fallback here")), ScriptedBackend(answer("coder here"))
    run = runner(fb, coder).start(CODER, REQUEST)
    assert run.expert is CODER and run.fallback_cause is None
    assert text_of(run.events).strip() == "coder here"
    assert fb.calls == 0


@pytest.mark.parametrize("exc", [ExpertUnavailable("refused"), ExpertTimeout("slow"), ExpertStreamBroken("junk")])
def test_failure_before_first_event_falls_back_silently(exc: Exception, caplog: pytest.LogCaptureFixture) -> None:
    fb, coder = ScriptedBackend(answer("fallback here")), ScriptedBackend(fail(exc))
    with caplog.at_level(logging.WARNING, logger="lemoe"):
        run = runner(fb, coder).start(CODER, REQUEST)
        events = list(run.events)
    assert run.expert is FALLBACK
    assert text_of(events).strip() == "fallback here"
    assert isinstance(events[-1], Done)
    assert run.fallback_cause and type(exc).__name__ in run.fallback_cause
    assert any("[Auto-Correction]" in r.message and "coder" in r.message for r in caplog.records)


def test_unexpected_backend_exception_counts_as_a_failed_expert() -> None:
    fb, coder = ScriptedBackend(answer("fallback here")), ScriptedBackend(fail(KeyError("boom")))
    run = runner(fb, coder).start(CODER, REQUEST)
    assert run.expert is FALLBACK and text_of(run.events).strip() == "fallback here"


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_error_from_a_backend_reaches_the_client_without_fallback_or_strike(stream: bool) -> None:
    # A backend that refuses the client's request (a bad option, say) is not a failed expert:
    # answering with the fallback would hide the client's mistake and bench a healthy expert.
    from modules.expert_health import ExpertHealth

    fb, coder = ScriptedBackend(answer("fallback here")), ScriptedBackend(fail(InvalidRequest("option 'x' is bad")))
    health = ExpertHealth(1, 60)
    r = ExpertRunner(CONFIG, {0: fb, 1: coder}, health)
    with pytest.raises(InvalidRequest, match="option 'x' is bad"):
        if stream:
            r.start(CODER, REQUEST)
        else:
            r.collect(CODER, REQUEST)
    assert coder.calls == 1 and fb.calls == 0
    assert not health.is_benched("coder")


def test_failure_after_first_event_is_raised_to_the_protocol_layer() -> None:
    fb, coder = ScriptedBackend(answer("fallback here")), ScriptedBackend(fail(ExpertStreamBroken("drop"), after=2))
    run = runner(fb, coder).start(CODER, REQUEST)
    assert run.expert is CODER
    got = []
    with pytest.raises(ExpertStreamBroken):
        for event in run.events:
            got.append(event)
    assert text_of(got) == "t0 t1 "
    assert fb.calls == 0


def test_stream_without_done_is_a_failure() -> None:
    def no_done(request: ChatRequest) -> Iterator[ChatEvent]:
        yield TextDelta("partial")
    run = runner(ScriptedBackend(answer("fb")), ScriptedBackend(no_done)).start(CODER, REQUEST)
    with pytest.raises(ExpertUnavailable):
        list(run.events)


def test_empty_stream_falls_back() -> None:
    def nothing(request: ChatRequest) -> Iterator[ChatEvent]:
        return iter(())
    run = runner(ScriptedBackend(answer("fb")), ScriptedBackend(nothing)).start(CODER, REQUEST)
    assert run.expert is FALLBACK


def test_non_streaming_failure_mid_answer_reruns_on_fallback() -> None:
    fb, coder = ScriptedBackend(answer("fallback here")), ScriptedBackend(fail(ExpertStreamBroken("drop"), after=3))
    answered_by, events, cause = runner(fb, coder).collect(CODER, REQUEST)
    assert answered_by is FALLBACK and cause is not None
    assert text_of(events).strip() == "fallback here"


def test_fallback_failing_too_is_a_503() -> None:
    fb, coder = ScriptedBackend(fail(ExpertUnavailable("down"))), ScriptedBackend(fail(ExpertUnavailable("down")))
    r = runner(fb, coder)
    with pytest.raises(ServiceUnavailable) as info:
        r.start(CODER, REQUEST)
    assert info.value.status_code == 503 and "down" not in info.value.message
    with pytest.raises(ServiceUnavailable):
        r.collect(CODER, REQUEST)
    with pytest.raises(ServiceUnavailable):
        r.start(FALLBACK, REQUEST)


def test_closing_the_run_closes_the_backend_stream() -> None:
    coder = ScriptedBackend(answer("a b c d e"))
    run = runner(ScriptedBackend(answer("fb")), coder).start(CODER, REQUEST)
    next(run.events)
    run.close()
    assert coder.closed_streams == 1


def test_expert_defaults_apply_under_the_request() -> None:
    from modules.expert_runner import request_for_expert

    tuned = ExpertConfig(id=1, label="coder", type="ollama", url="http://127.0.0.1:1", model_name="m",
                         system_prompt="You write code.", options={"temperature": 0.2, "num_predict": 100})
    req = ChatRequest(model=None, messages=[Message(role="user", content="hi")], options={"num_predict": 5})
    out = request_for_expert(tuned, req)
    assert out.options == {"temperature": 0.2, "num_predict": 5}
    assert [m.role for m in out.messages] == ["system", "user"] and out.messages[0].content == "You write code."
    assert req.options == {"num_predict": 5} and len(req.messages) == 1  # the original is untouched
    own_system = ChatRequest(model=None, messages=[Message(role="system", content="mine"), Message(role="user", content="x")])
    assert request_for_expert(tuned, own_system).messages[0].content == "mine"


def test_runner_sends_the_expert_defaults_to_the_backend() -> None:
    seen: list[ChatRequest] = []

    def record(request: ChatRequest) -> Iterator[ChatEvent]:
        seen.append(request)
        yield Done()

    tuned = ExpertConfig(id=1, label="coder", type="ollama", url="http://127.0.0.1:1", model_name="m",
                         options={"temperature": 0.2})
    config = CONFIG.model_copy(update={"experts": (FALLBACK, tuned)})
    ExpertRunner(config, {0: ScriptedBackend(answer("fb")), 1: ScriptedBackend(record)}).collect(tuned, REQUEST)
    assert seen[0].options == {"temperature": 0.2}


# A fallback like the packaged SmolLM2: JSON, no images, no tools, 2048 tokens.
TEXT_ONLY_FALLBACK = ExpertConfig(id=0, label="fallback", type="ollama", url="http://127.0.0.1:1", model_name="m",
                                  capabilities=["json"], context_length=2048)
PICTURE = ChatRequest(model=None, messages=[Message(role="user", content="what is this", images=["iVBORw0KGgo="])],
                      stream=True)


def text_only_runner(fallback: ScriptedBackend, coder: ScriptedBackend) -> ExpertRunner:
    config = CONFIG.model_copy(update={"experts": (TEXT_ONLY_FALLBACK, CODER)})
    return ExpertRunner(config, {0: fallback, 1: coder})


@pytest.mark.parametrize("stream", [True, False])
def test_no_fallback_to_an_expert_that_cannot_take_the_request(stream: bool, caplog: pytest.LogCaptureFixture) -> None:
    fb, coder = ScriptedBackend(answer("I see nothing")), ScriptedBackend(fail(ExpertUnavailable("down")))
    r = text_only_runner(fb, coder)
    with caplog.at_level(logging.WARNING, logger="lemoe"), pytest.raises(ServiceUnavailable) as info:
        r.start(CODER, PICTURE) if stream else r.collect(CODER, PICTURE)
    assert info.value.status_code == 503 and info.value.retry_after
    assert info.value.message == "no expert that supports vision is available to answer right now"
    assert fb.calls == 0, "the images must never reach the text-only fallback"
    assert any("cannot take this request (lacks vision)" in rec.message for rec in caplog.records)


def test_no_fallback_for_tools_or_a_prompt_longer_than_the_fallbacks_context() -> None:
    fb, coder = ScriptedBackend(answer("fb")), ScriptedBackend(fail(ExpertUnavailable("down")))
    r = text_only_runner(fb, coder)
    tools = ChatRequest(model=None, messages=[Message(role="user", content="hi")],
                        tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(ServiceUnavailable, match="supports tools"):
        r.collect(CODER, tools)
    long = ChatRequest(model=None, messages=[Message(role="user", content="word " * 2000)])
    with pytest.raises(ServiceUnavailable, match="context large enough"):
        r.collect(CODER, long)
    assert fb.calls == 0
    # What the fallback can take still falls back silently.
    answered_by, events, _ = r.collect(CODER, ChatRequest(model=None, messages=[Message(role="user", content="hi")],
                                                          format="json"))
    assert answered_by is TEXT_ONLY_FALLBACK and text_of(events).strip() == "fb"


def test_benched_expert_is_not_replaced_by_a_fallback_that_cannot_take_the_request() -> None:
    from modules.expert_health import ExpertHealth

    fb, coder = ScriptedBackend(answer("fb")), ScriptedBackend(answer("coder"))
    config = CONFIG.model_copy(update={"experts": (TEXT_ONLY_FALLBACK, CODER)})
    health = ExpertHealth(1, 60)
    health.record_failure("coder", "down")
    r = ExpertRunner(config, {0: fb, 1: coder}, health)
    with pytest.raises(ServiceUnavailable, match="supports vision"):
        r.start(CODER, PICTURE)
    assert fb.calls == 0 and coder.calls == 0
    assert r.start(CODER, REQUEST).expert is TEXT_ONLY_FALLBACK

"""`api` experts: the real LiteLLM against the loopback fake upstream (OpenAI and Ollama providers)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from modules.chat_types import (
    ChatEvent,
    ChatRequest,
    Done,
    Message,
    TextDelta,
    ThinkingDelta,
    ToolCallDelta,
)
from modules.config_manager import ExpertConfig, ServerConfig
from modules.errors import (
    ExpertAnswerTooLarge,
    ExpertStreamBroken,
    ExpertTimeout,
    ExpertUnavailable,
    InvalidRequest,
)
from modules.litellm_backend import (
    LOCAL_COST_MAP_ENV,
    ApiBackend,
    api_key_from_environment,
    expert_error_from_litellm,
    import_litellm,
    litellm_arguments_from_request,
    litellm_error_table,
    litellm_model_name,
)
from tests.fakes.fake_upstream import FakeUpstream
from tests.fakes.lone_runner import lone_runner

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def litellm() -> ModuleType:
    return import_litellm()


def _expert(provider: str, model: str, api_base: str, **fields: object) -> ExpertConfig:
    return ExpertConfig(id=1, label="api", type="api", provider=provider, model_name=model, api_base=api_base,
                        **fields)  # type: ignore[arg-type]


def _openai(litellm: ModuleType, upstream: FakeUpstream, model: str = "gpt-test", key: str | None = "sk-test",
            read_timeout: float = 5.0) -> ApiBackend:
    server = ServerConfig(read_timeout=read_timeout)
    return ApiBackend(_expert("openai", model, upstream.url + "/v1"), server, key, litellm)


def _ollama(litellm: ModuleType, upstream: FakeUpstream, model: str = "llama-test") -> ApiBackend:
    return ApiBackend(_expert("ollama_chat", model, upstream.url), ServerConfig(read_timeout=5.0), None, litellm)


def _chat(text: str = "hi", **fields: object) -> ChatRequest:
    return ChatRequest(model="api", messages=[Message(role="user", content=text)], **fields)  # type: ignore[arg-type]


def _text(events: list[ChatEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


# --- streaming through each provider ----------------------------------------------------------

def test_openai_provider_streams_text_and_usage(litellm: ModuleType, fake_upstream: FakeUpstream) -> None:
    events = list(_openai(litellm, fake_upstream).stream_chat(_chat()))
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["Hello", " from", " gpt-test"]
    done = events[-1]
    assert isinstance(done, Done) and done.done_reason == "stop"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (5, 3)
    sent = fake_upstream.requests_to("/v1/chat/completions")[-1]
    assert sent.headers["Authorization"] == "Bearer sk-test"
    assert sent.json["model"] == "gpt-test" and sent.json["stream"] is True
    assert sent.json["messages"] == [{"role": "user", "content": "hi"}]


def test_ollama_chat_provider_streams_text_and_usage(litellm: ModuleType, fake_upstream: FakeUpstream) -> None:
    events = list(_ollama(litellm, fake_upstream).stream_chat(_chat()))
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["Hello", " from", " llama-test"]
    done = events[-1]
    assert isinstance(done, Done) and (done.usage.prompt_tokens, done.usage.completion_tokens) == (5, 3)
    assert fake_upstream.requests_to("/api/chat")[-1].json["model"] == "llama-test"


def test_options_are_mapped_to_provider_parameters(litellm: ModuleType, fake_upstream: FakeUpstream) -> None:
    options = {"num_predict": 12, "temperature": 0.2, "top_p": 0.5, "seed": 9, "stop": ["END"], "top_k": 4}
    list(_openai(litellm, fake_upstream).stream_chat(_chat(options=options)))
    body = fake_upstream.requests_to("/v1/chat/completions")[-1].json
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["seed"], body["stop"]) == (
        12, 0.2, 0.5, 9, ["END"])
    list(_ollama(litellm, fake_upstream).stream_chat(_chat(options=options)))
    ollama_options = fake_upstream.requests_to("/api/chat")[-1].json["options"]
    assert (ollama_options["num_predict"], ollama_options["top_k"], ollama_options["temperature"]) == (12, 4, 0.2)


def test_reasoning_levels_pass_both_ways(litellm: ModuleType, fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("thinker", thinking=["Let me", " think."])
    events = list(_ollama(litellm, fake_upstream, "thinker").stream_chat(_chat(think="high")))
    # LiteLLM's ollama_chat provider turns reasoning_effort into Ollama's `think` (a plain switch:
    # LiteLLM drops the level on the way).
    assert fake_upstream.requests_to("/api/chat")[-1].json["think"] is True
    assert "".join(e.text for e in events if isinstance(e, ThinkingDelta)) == "Let me think."
    events = list(_openai(litellm, fake_upstream, "thinker").stream_chat(_chat(think="low")))
    assert fake_upstream.requests_to("/v1/chat/completions")[-1].json["reasoning_effort"] == "low"
    assert "".join(e.text for e in events if isinstance(e, ThinkingDelta)) == "Let me think."
    # A bare switch has no spelling every provider takes: nothing is sent.
    assert "reasoning_effort" not in litellm_arguments_from_request(_chat(think=True))


def test_tool_calls_are_assembled_from_fragments(litellm: ModuleType, fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("tools", tool_call=("get_weather", {"city": "Paris"}))
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    for backend in (_openai(litellm, fake_upstream, "tools"), _ollama(litellm, fake_upstream, "tools")):
        events = list(backend.stream_chat(_chat(tools=tools)))
        calls = [e.call for e in events if isinstance(e, ToolCallDelta)]
        assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris"})]
        assert isinstance(events[-1], Done)
    assert fake_upstream.requests_to("/v1/chat/completions")[-1].json["tools"] == tools


def test_a_length_finish_is_reported(litellm: ModuleType, fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("short", done_reason="length")
    events = list(_openai(litellm, fake_upstream, "short").stream_chat(_chat()))
    assert isinstance(events[-1], Done) and events[-1].done_reason == "length"


# --- failures ----------------------------------------------------------------------------------

def test_a_failing_provider_is_unavailable(litellm: ModuleType, fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("down", fail_status=500)
    with pytest.raises(ExpertUnavailable):
        list(_openai(litellm, fake_upstream, "down").stream_chat(_chat()))
    with pytest.raises(ExpertUnavailable):
        list(_ollama(litellm, fake_upstream, "down").stream_chat(_chat()))
    # No retries: LeMoE answers a failure with its fallback expert, not a longer wait.
    assert len(fake_upstream.requests_to("/v1/chat/completions")) == 1


def test_a_wrong_key_is_unavailable(litellm: ModuleType, fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("locked", require_key="right-key")
    with pytest.raises(ExpertUnavailable):
        list(_openai(litellm, fake_upstream, "locked", key="wrong-key").stream_chat(_chat()))
    assert _text(list(_openai(litellm, fake_upstream, "locked", key="right-key").stream_chat(_chat()))) == (
        "Hello from locked")


def test_a_refused_connection_is_unavailable(litellm: ModuleType, closed_port_url: str) -> None:
    backend = ApiBackend(_expert("openai", "m", closed_port_url + "/v1"), ServerConfig(), "k", litellm)
    with pytest.raises(ExpertUnavailable):
        list(backend.stream_chat(_chat()))


def test_a_slow_provider_times_out(litellm: ModuleType, fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("slow", delay_first=3.0)
    with pytest.raises(ExpertTimeout):
        list(_openai(litellm, fake_upstream, "slow", read_timeout=0.5).stream_chat(_chat()))


def test_a_drop_mid_stream_breaks_the_stream(litellm: ModuleType, fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("drops", drop_after=1)
    stream = _openai(litellm, fake_upstream, "drops").stream_chat(_chat())
    assert next(stream) == TextDelta("Hello")
    with pytest.raises(ExpertStreamBroken):
        list(stream)


def _bounded(litellm: ModuleType, upstream: FakeUpstream, model: str, answer_bytes: int) -> ApiBackend:
    server = ServerConfig(read_timeout=5.0, max_upstream_line_bytes=1024, max_upstream_answer_bytes=answer_bytes)
    return ApiBackend(_expert("openai", model, upstream.url + "/v1"), server, "sk-test", litellm)


def test_an_endless_answer_ends_at_the_answer_bound(litellm: ModuleType, fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("endless", endless=True)
    stream = _bounded(litellm, fake_upstream, "endless", 4096).stream_chat(_chat())
    assert next(stream) == TextDelta("Hello")
    texts = []
    with pytest.raises(ExpertAnswerTooLarge):
        for event in stream:
            texts.append(event.text if isinstance(event, TextDelta) else "")
    # It ended at the bound, not at some later accident of the stream.
    assert 4096 - 16 <= len("Hello" + "".join(texts)) <= 4096


def test_an_answer_over_the_bound_before_its_first_piece_yields_nothing(
        litellm: ModuleType, fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("huge", tokens=["x" * 5000])
    stream = _bounded(litellm, fake_upstream, "huge", 4096).stream_chat(_chat())
    # Nothing was sent yet, so the runner can still answer with the fallback expert.
    with pytest.raises(ExpertAnswerTooLarge):
        next(stream)


def test_a_bad_option_is_refused_before_calling(litellm: ModuleType, fake_upstream: FakeUpstream) -> None:
    with pytest.raises(InvalidRequest):
        list(_openai(litellm, fake_upstream).stream_chat(_chat(options={"num_predict": "many"})))
    assert fake_upstream.requests == []


def test_a_bad_option_reaching_the_runner_is_the_clients_error_not_a_fallback(
    litellm: ModuleType, fake_upstream: FakeUpstream
) -> None:
    backend = _openai(litellm, fake_upstream)
    runner, fallback, health = lone_runner(backend.expert, backend)
    request = _chat()
    request.options["num_predict"] = "many"
    for start in (runner.start, runner.collect):
        with pytest.raises(InvalidRequest):
            start(backend.expert, request)
    assert fallback.calls == 0 and not health.is_benched("api")
    assert fake_upstream.requests == []


# --- the exception map ------------------------------------------------------------------------

def _litellm_exception_classes(litellm: ModuleType) -> list[type[BaseException]]:
    return [c for _, c in inspect.getmembers(litellm.exceptions, inspect.isclass)
            if issubclass(c, Exception) and c.__module__.startswith("litellm")]


def _instance(cls: type[BaseException]) -> BaseException:
    # LiteLLM's constructors all differ; the mapping only looks at the class.
    return cls.__new__(cls)


def test_every_litellm_exception_is_mapped(litellm: ModuleType) -> None:
    table = litellm_error_table(litellm)
    classes = _litellm_exception_classes(litellm)
    assert len(classes) > 20
    unmapped = [c.__name__ for c in classes if not any(issubclass(c, kind) for kind, _ in table)]
    assert unmapped == []


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Timeout", ExpertTimeout),
        ("AuthenticationError", ExpertUnavailable),
        ("PermissionDeniedError", ExpertUnavailable),
        ("APIConnectionError", ExpertUnavailable),
        ("RateLimitError", ExpertUnavailable),
        ("ServiceUnavailableError", ExpertUnavailable),
        ("InternalServerError", ExpertUnavailable),
        ("NotFoundError", ExpertUnavailable),
        ("BadRequestError", ExpertUnavailable),
        ("ContextWindowExceededError", ExpertUnavailable),
        ("APIError", ExpertUnavailable),
        ("BudgetExceededError", ExpertUnavailable),
        ("MidStreamFallbackError", ExpertStreamBroken),
    ],
)
def test_exception_mapping_before_the_first_event(litellm: ModuleType, name: str, expected: type) -> None:
    mapped = expert_error_from_litellm(_instance(getattr(litellm.exceptions, name)), litellm_error_table(litellm),
                                       started=False)
    assert type(mapped) is expected


def test_any_litellm_failure_after_the_first_event_breaks_the_stream(litellm: ModuleType) -> None:
    table = litellm_error_table(litellm)
    for cls in _litellm_exception_classes(litellm):
        assert type(expert_error_from_litellm(_instance(cls), table, started=True)) is ExpertStreamBroken


def test_exceptions_that_are_not_litellm_s_are_not_mapped(litellm: ModuleType) -> None:
    assert expert_error_from_litellm(KeyError("x"), litellm_error_table(litellm), started=False) is None


# --- configuration ----------------------------------------------------------------------------

def test_the_key_comes_from_the_named_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    expert = _expert("openai", "m", "http://127.0.0.1:1", api_key_env="LEMOE_TEST_API_KEY")
    with pytest.raises(ExpertUnavailable, match="LEMOE_TEST_API_KEY"):
        api_key_from_environment(expert)
    monkeypatch.setenv("LEMOE_TEST_API_KEY", " sk-abc ")
    assert api_key_from_environment(expert) == "sk-abc"
    no_key = _expert("ollama_chat", "m", "http://127.0.0.1:1")
    assert api_key_from_environment(no_key) is None


def test_model_name_carries_the_provider() -> None:
    assert litellm_model_name(_expert("anthropic", "claude-x", "http://127.0.0.1:1")) == "anthropic/claude-x"
    assert litellm_model_name(ExpertConfig(id=1, label="a", type="api", model_name="gpt-4o-mini")) == "gpt-4o-mini"


def test_arguments_from_a_request() -> None:
    request = _chat(format={"type": "object"}, options={"num_predict": -1, "repeat_penalty": 1.1})
    arguments = litellm_arguments_from_request(request)
    assert "max_tokens" not in arguments
    assert arguments["repetition_penalty"] == 1.1
    assert arguments["response_format"]["json_schema"]["schema"] == {"type": "object"}
    assert litellm_arguments_from_request(_chat(format="json"))["response_format"] == {"type": "json_object"}
    completion = ChatRequest(model="api", messages=[], kind="completion", prompt="2+2=")
    assert litellm_arguments_from_request(completion)["messages"] == [{"role": "user", "content": "2+2="}]
    with pytest.raises(InvalidRequest):
        litellm_arguments_from_request(_chat(options={"stop": 3}))


def test_import_switches_litellm_to_its_local_cost_map(litellm: ModuleType) -> None:
    assert os.environ[LOCAL_COST_MAP_ENV] == "True"
    assert litellm.suppress_debug_info is True


def _imports_after_building_backends(experts: list[dict[str, object]], tmp_path: Path) -> dict[str, bool]:
    (tmp_path / "config").mkdir(parents=True)
    (tmp_path / "config" / "experts.json").write_text(json.dumps({"experts": experts}))
    (tmp_path / "config" / "config.json").write_text(json.dumps({"router": {"model_path": ""}}))
    script = (
        "import json, sys\n"
        "from modules.config_manager import load_config\n"
        "from modules.model_pool import ModelPool\n"
        "from modules.backend_registry import build_backends\n"
        f"config = load_config({str(tmp_path / 'config' / 'config.json')!r}, {str(tmp_path)!r})\n"
        "build_backends(config, ModelPool(3, 300))\n"
        "print(json.dumps({m: m in sys.modules for m in ('litellm', 'onnxruntime_genai', 'llama_cpp')}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
                         env={**os.environ, "LEMOE_TEST_API_KEY": "k"})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_litellm_is_imported_only_when_an_api_expert_is_configured(tmp_path: Path) -> None:
    remote = {"id": 0, "label": "fallback", "type": "ollama", "url": "http://127.0.0.1:1", "model_name": "m"}
    api = {"id": 1, "label": "cloud", "type": "api", "provider": "openai", "model_name": "m",
           "api_key_env": "LEMOE_TEST_API_KEY", "keywords": ["x"]}
    without = _imports_after_building_backends([remote], tmp_path / "without")
    assert without == {"litellm": False, "onnxruntime_genai": False, "llama_cpp": False}
    with_api = _imports_after_building_backends([remote, api], tmp_path / "with")
    assert with_api["litellm"] is True


_NO_OUTSIDE_SCRIPT = """
import json, socket, sys
outside = []
real_getaddrinfo = socket.getaddrinfo

def loopback_only(host, *args, **kwargs):
    if host not in ("127.0.0.1", "localhost", "::1", None):
        outside.append(host)
        raise OSError("outside connections are blocked in this test")
    return real_getaddrinfo(host, *args, **kwargs)

socket.getaddrinfo = loopback_only
from modules.chat_types import ChatRequest, Message
from modules.config_manager import ExpertConfig, ServerConfig
from modules.litellm_backend import ApiBackend, import_litellm
litellm = import_litellm()
expert = ExpertConfig(id=1, label="a", type="api", provider="openai", model_name="m", api_base=sys.argv[1] + "/v1")
request = ChatRequest(model="a", messages=[Message(role="user", content="hi")])
events = list(ApiBackend(expert, ServerConfig(), "k", litellm).stream_chat(request))
print(json.dumps({"outside": outside, "events": len(events)}))
"""


def test_litellm_reaches_nothing_outside_at_import_or_on_a_request(fake_upstream: FakeUpstream) -> None:
    # A plain `import litellm` fetches its cost map from the internet (and retries with sleeps).
    env = {k: v for k, v in os.environ.items() if k != LOCAL_COST_MAP_ENV}
    out = subprocess.run([sys.executable, "-c", _NO_OUTSIDE_SCRIPT, fake_upstream.url], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"outside": [], "events": 4}

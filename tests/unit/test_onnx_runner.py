"""The ONNX backend on a real (tiny, built here) onnxruntime-genai model, under a real model pool."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from modules.chat_types import ChatEvent, ChatRequest, Done, Message, TextDelta
from modules.config_manager import ExpertConfig, LocalModelsConfig
from modules.errors import ExpertUnavailable, InvalidRequest
from modules.model_pool import ModelPool
from modules.onnx_runner import (
    OnnxBackend,
    StopScanner,
    guidance_from_format,
    max_length_from_num_predict,
    num_predict_from_options,
    search_options_from_options,
)
from tests.fakes.tiny_onnx_model import ANSWER, build_tiny_onnx_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_onnx_model(tmp_path_factory.mktemp("models") / "tiny")


def _expert() -> ExpertConfig:
    return ExpertConfig(id=1, label="tiny", type="local", format="onnx", model_path="tiny")


def _backend(model_dir: Path, pool: ModelPool) -> OnnxBackend:
    return OnnxBackend(_expert(), model_dir, pool, LocalModelsConfig())


def _chat(text: str = "hello", **fields: object) -> ChatRequest:
    return ChatRequest(model="tiny", messages=[Message(role="user", content=text)], **fields)  # type: ignore[arg-type]


def _text(events: list[ChatEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def test_streams_the_answer_token_by_token(model_dir: Path) -> None:
    pool = ModelPool(3, 300)
    events = list(_backend(model_dir, pool).stream_chat(_chat()))
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) == len(ANSWER)  # one byte-level token per character
    assert _text(events) == ANSWER
    done = events[-1]
    assert isinstance(done, Done) and done.done_reason == "stop"
    # The template renders "user: hello\nassistant:\n": 23 byte tokens.
    assert done.usage.prompt_tokens == len("user: hello\nassistant:\n")
    assert done.usage.completion_tokens == len(ANSWER) + 1  # the end-of-text token included
    assert done.usage.load_duration_ns > 0


def test_num_predict_cuts_the_answer_with_reason_length(model_dir: Path) -> None:
    events = list(_backend(model_dir, ModelPool(3, 300)).stream_chat(_chat(options={"num_predict": 3})))
    assert _text(events) == ANSWER[:3]
    assert isinstance(events[-1], Done) and events[-1].done_reason == "length"
    assert events[-1].usage.completion_tokens == 3


def test_a_stop_string_ends_the_answer_before_it(model_dir: Path) -> None:
    events = list(_backend(model_dir, ModelPool(3, 300)).stream_chat(_chat(options={"stop": ["now"]})))
    assert _text(events) == "Hey "
    assert isinstance(events[-1], Done) and events[-1].done_reason == "stop"


def test_json_format_is_enforced_by_guidance(model_dir: Path) -> None:
    events = list(_backend(model_dir, ModelPool(3, 300)).stream_chat(_chat(format="json", options={"num_predict": 8})))
    # Unconstrained, this model says "Hey now."; constrained, it must open a JSON object.
    assert _text(events).startswith("{")


def test_sampling_options_still_produce_the_dominant_answer(model_dir: Path) -> None:
    request = _chat(options={"temperature": 0.5, "top_k": 5, "top_p": 0.9, "seed": 7, "repeat_penalty": 1.0})
    assert _text(list(_backend(model_dir, ModelPool(3, 300)).stream_chat(request))) == ANSWER


def test_a_completion_prompt_is_answered(model_dir: Path) -> None:
    # Raw: no template, so the prompt's own last character picks the way into the answer.
    request = ChatRequest(model="tiny", messages=[], kind="completion", prompt="Count: 1, 2", raw=True)
    events = list(_backend(model_dir, ModelPool(3, 300)).stream_chat(request))
    assert _text(events) == ANSWER
    assert isinstance(events[-1], Done) and events[-1].usage.prompt_tokens == len("Count: 1, 2")
    mid_answer = ChatRequest(model="tiny", messages=[], kind="completion", prompt="Hey n", raw=True)
    assert _text(list(_backend(model_dir, ModelPool(3, 300)).stream_chat(mid_answer))) == "ow."


def test_a_model_without_chat_template_gets_a_plain_layout(model_dir: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(model_dir, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    events = list(_backend(plain, ModelPool(3, 300)).stream_chat(_chat("hi")))
    assert _text(events) == ANSWER
    assert isinstance(events[-1], Done) and events[-1].usage.prompt_tokens == len("user: hi\nassistant:")


def test_the_model_stays_loaded_between_requests_and_is_shared(model_dir: Path) -> None:
    pool = ModelPool(3, 300)
    loads: list[str] = []
    backend = _backend(model_dir, pool)
    original = backend._load

    def counting_load() -> object:
        loads.append("load")
        return original()

    backend._load = counting_load  # type: ignore[method-assign]
    list(backend.stream_chat(_chat()))
    second = list(backend.stream_chat(_chat()))
    assert loads == ["load"]
    assert isinstance(second[-1], Done) and second[-1].usage.load_duration_ns < 50_000_000
    assert [m.key for m in pool.loaded()] == [str(model_dir.resolve())]


def test_keep_alive_zero_unloads_after_the_answer(model_dir: Path) -> None:
    pool = ModelPool(3, 300)
    list(_backend(model_dir, pool).stream_chat(_chat(keep_alive=0)))
    assert pool.loaded() == []


def test_a_model_in_use_is_not_unloaded_until_its_stream_ends(model_dir: Path, tmp_path: Path) -> None:
    other = shutil.copytree(model_dir, tmp_path / "other")
    pool = ModelPool(1, 300)
    first = _backend(model_dir, pool)
    stream = first.stream_chat(_chat())
    assert isinstance(next(stream), TextDelta)  # leased and generating
    # A second model needs room; the first is in use, so the pool grows past its limit instead.
    second = _backend(other, pool).stream_chat(_chat())
    assert isinstance(next(second), TextDelta)
    assert {m.key for m in pool.loaded()} == {str(model_dir.resolve()), str(other.resolve())}
    # The second answer ends first: its model is now the idle one, and goes to restore the limit.
    assert _text(list(second)) == ANSWER[1:]
    assert [m.key for m in pool.loaded()] == [str(model_dir.resolve())]
    assert _text(list(stream)) == ANSWER[1:]
    assert [m.key for m in pool.loaded()] == [str(model_dir.resolve())]


def test_preload_and_unload(model_dir: Path) -> None:
    pool = ModelPool(3, 300)
    backend = _backend(model_dir, pool)
    backend.preload(keep_alive=-1)
    [loaded] = pool.loaded()
    assert loaded.expires_at is None
    assert backend.unload() is True
    assert pool.loaded() == []
    assert backend.unload() is False


def test_concurrent_requests_on_one_model_take_turns(model_dir: Path) -> None:
    backend = _backend(model_dir, ModelPool(3, 300))
    answers: list[str] = []

    def ask() -> None:
        answers.append(_text(list(backend.stream_chat(_chat()))))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert answers == [ANSWER] * 4


def test_a_folder_that_is_not_a_model_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExpertUnavailable):
        list(_backend(tmp_path / "empty", ModelPool(3, 300)).stream_chat(_chat()))


def test_a_broken_onnx_file_is_unavailable_and_nothing_stays_loaded(model_dir: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(model_dir, tmp_path / "broken")
    (broken / "model.onnx").write_bytes(b"not a model")
    pool = ModelPool(3, 300)
    with pytest.raises(ExpertUnavailable):
        list(_backend(broken, pool).stream_chat(_chat()))
    assert pool.loaded() == []


def test_a_prompt_longer_than_the_context_is_unavailable(model_dir: Path) -> None:
    with pytest.raises(ExpertUnavailable):
        list(_backend(model_dir, ModelPool(3, 300)).stream_chat(_chat("x" * 600)))


def test_bad_options_are_refused_before_loading(model_dir: Path) -> None:
    pool = ModelPool(3, 300)
    with pytest.raises(InvalidRequest):
        list(_backend(model_dir, pool).stream_chat(_chat(options={"temperature": "hot"})))
    assert pool.loaded() == []


def test_search_options_from_ollama_names() -> None:
    assert search_options_from_options({"temperature": 0.7, "top_k": 40, "seed": 3, "repeat_penalty": 1.1}) == {
        "temperature": 0.7, "do_sample": True, "top_k": 40, "random_seed": 3, "repetition_penalty": 1.1,
    }
    assert search_options_from_options({"temperature": 0}) == {"do_sample": False}
    assert search_options_from_options({"mirostat": 2}) == {}
    with pytest.raises(InvalidRequest):
        search_options_from_options({"top_k": True})


def test_num_predict_and_max_length() -> None:
    assert num_predict_from_options({}) is None
    assert num_predict_from_options({"num_predict": -1}) is None
    assert num_predict_from_options({"num_predict": -2}) is None
    assert num_predict_from_options({"num_predict": 5}) == 5
    with pytest.raises(InvalidRequest):
        num_predict_from_options({"num_predict": "5"})
    assert max_length_from_num_predict(5, 10, 100) == 15
    assert max_length_from_num_predict(500, 10, 100) == 100
    assert max_length_from_num_predict(None, 10, 100) == 100
    with pytest.raises(ExpertUnavailable):
        max_length_from_num_predict(None, 100, 100)


def test_guidance_from_format() -> None:
    assert guidance_from_format(None) is None
    assert guidance_from_format("json") == ("json_schema", '{"type": "object"}')
    kind, schema = guidance_from_format({"type": "object", "required": ["a"]})  # type: ignore[misc]
    assert kind == "json_schema" and json.loads(schema)["required"] == ["a"]
    with pytest.raises(InvalidRequest):
        guidance_from_format("yaml")


def test_stop_scanner_holds_back_a_possible_stop_and_releases_it() -> None:
    scanner = StopScanner(["</end>"])
    assert scanner.feed("abc</") == "abc"
    assert scanner.feed("en") == ""
    assert scanner.feed("x") == "</enx"
    assert scanner.feed("tail</end>more") == "tail"
    assert scanner.stopped


def test_stop_scanner_picks_the_earliest_stop_and_flushes_the_rest() -> None:
    scanner = StopScanner(["b", "cd"])
    assert scanner.feed("xxcdb") == "xx"
    unstopped = StopScanner(["zz"])
    assert unstopped.feed("az") == "a"
    assert unstopped.flush() == "z"
    assert not unstopped.stopped

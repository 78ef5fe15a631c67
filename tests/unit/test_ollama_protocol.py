"""Ollama native wire protocol: parsing, answers, listings and the upstream client side.

Shapes are checked against the real `ollama` library's pydantic types, so a field mistake that
would break ollama-python fails here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from ollama import _types as ollama_types

from modules.chat_types import (
    ChatEvent,
    ChatRequest,
    Done,
    Message,
    ModelCard,
    TextDelta,
    ThinkingDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from modules.errors import (
    ExpertStreamBroken,
    InvalidRequest,
    RateLimited,
    UnknownModel,
)
from modules.protocol.ollama_protocol import (
    chat_request_from_ollama,
    events_from_ollama_ndjson,
    generate_request_from_ollama,
    is_load_probe,
    keep_alive_seconds,
    ollama_chat_body_from_request,
    ollama_chat_from_events,
    ollama_error_body,
    ollama_generate_body_from_request,
    ollama_generate_from_events,
    ollama_generate_ndjson_from_events,
    ollama_load_response,
    ollama_ndjson_from_events,
    ollama_ps,
    ollama_show,
    ollama_tags,
    ollama_version,
)

MODEL = "programador:latest"
USER = {"role": "user", "content": "hi"}


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [USER], **fields}


def card(**overrides: Any) -> ModelCard:
    values: dict[str, Any] = {
        "name": MODEL,
        "family": "lemoe",
        "format": "gguf",
        "parameter_size": "135M",
        "quantization_level": "Q4_1",
        "size": 123456,
        "digest": "ab" * 32,
        "modified_at": 1767225600.0,
        "context_length": 8192,
        "capabilities": ("completion", "tools"),
        "description": "Writes code.\nAny language.",
    }
    values.update(overrides)
    return ModelCard(**values)


def parse_lines(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines]


def weather_call(index: int = 0, call_id: str | None = "call_1") -> ToolCall:
    return ToolCall(name="get_weather", arguments={"city": "Tokyo"}, id=call_id, index=index)


# ---------------------------------------------------------------------------------------------
# /api/chat requests
# ---------------------------------------------------------------------------------------------


def message_body(**fields: Any) -> dict[str, Any]:
    return chat_body(messages=[{"role": "user", "content": "hi", **fields}])


INVALID_CHAT_BODIES = [
    pytest.param([], "request body must be a JSON object", id="body-list"),
    pytest.param("hello", "request body must be a JSON object", id="body-string"),
    pytest.param(None, "request body must be a JSON object", id="body-null"),
    pytest.param({"messages": [USER]}, "model is required", id="model-missing"),
    pytest.param(chat_body(model=""), "model is required", id="model-empty"),
    pytest.param(chat_body(model="  "), "model is required", id="model-blank"),
    pytest.param(chat_body(model=7), "model is required", id="model-number"),
    pytest.param(chat_body(messages="hi"), "messages must be a list", id="messages-string"),
    pytest.param(chat_body(messages={"role": "user"}), "messages must be a list", id="msgs-obj"),
    pytest.param(chat_body(messages=["hi"]), "messages[0] must be an object", id="msg-string"),
    pytest.param(
        chat_body(messages=[USER, {"role": "robot", "content": "x"}]),
        "messages[1].role",
        id="role-invalid",
    ),
    pytest.param(chat_body(messages=[{"content": "x"}]), "messages[0].role", id="role-missing"),
    pytest.param(message_body(content=["a"]), "messages[0].content", id="content-list"),
    pytest.param(message_body(content=5), "messages[0].content", id="content-number"),
    pytest.param(message_body(images="abc"), "messages[0].images", id="images-string"),
    pytest.param(message_body(images=[1]), "messages[0].images", id="images-number"),
    pytest.param(message_body(tool_calls={}), "messages[0].tool_calls", id="tool-calls-obj"),
    pytest.param(
        message_body(tool_calls=[{"name": "f"}]),
        "messages[0].tool_calls[0].function",
        id="tool-call-no-function",
    ),
    pytest.param(
        message_body(tool_calls=[{"function": {"arguments": {}}}]),
        "messages[0].tool_calls[0].function.name",
        id="tool-call-no-name",
    ),
    pytest.param(
        message_body(tool_calls=[{"function": {"name": 3, "arguments": {}}}]),
        "messages[0].tool_calls[0].function.name",
        id="tool-call-name-number",
    ),
    pytest.param(
        message_body(tool_calls=[{"function": {"name": "f", "arguments": [1]}}]),
        "messages[0].tool_calls[0].function.arguments",
        id="arguments-list",
    ),
    pytest.param(
        message_body(tool_calls=[{"function": {"name": "f", "arguments": "[1, 2]"}}]),
        "messages[0].tool_calls[0].function.arguments",
        id="arguments-json-list",
    ),
    pytest.param(
        message_body(tool_calls=[{"function": {"name": "f", "arguments": "{oops"}}]),
        "messages[0].tool_calls[0].function.arguments",
        id="arguments-bad-json",
    ),
    pytest.param(message_body(tool_name=5), "messages[0].tool_name", id="tool-name-number"),
    pytest.param(message_body(tool_call_id=[]), "messages[0].tool_call_id", id="tool-call-id"),
    pytest.param(chat_body(stream="yes"), "stream must be a boolean", id="stream-string"),
    pytest.param(chat_body(stream=1), "stream must be a boolean", id="stream-int"),
    pytest.param(chat_body(options=[1]), "options must be an object", id="options-list"),
    pytest.param(chat_body(options="x"), "options must be an object", id="options-string"),
    pytest.param(chat_body(options={"num_predict": "10"}), "options.num_predict", id="np-str"),
    pytest.param(chat_body(options={"num_predict": 1.5}), "options.num_predict", id="np-frac"),
    pytest.param(chat_body(options={"num_predict": True}), "options.num_predict", id="np-bool"),
    pytest.param(chat_body(options={"seed": "x"}), "options.seed", id="seed-string"),
    pytest.param(chat_body(options={"num_ctx": 2.5}), "options.num_ctx", id="num-ctx-frac"),
    pytest.param(chat_body(options={"temperature": "hot"}), "options.temperature", id="temp-str"),
    pytest.param(chat_body(options={"top_p": False}), "options.top_p", id="top-p-bool"),
    pytest.param(chat_body(options={"stop": [1]}), "options.stop", id="stop-numbers"),
    pytest.param(chat_body(options={"stop": 5}), "options.stop", id="stop-number"),
    pytest.param(chat_body(options={"use_mmap": "yes"}), "options.use_mmap", id="bool-option"),
    pytest.param(chat_body(keep_alive="soon"), "keep_alive", id="keep-alive-word"),
    pytest.param(chat_body(keep_alive="5 minutes"), "keep_alive", id="keep-alive-spaced"),
    pytest.param(chat_body(keep_alive="m5"), "keep_alive", id="keep-alive-unit-first"),
    pytest.param(chat_body(keep_alive="5d"), "keep_alive", id="keep-alive-days"),
    pytest.param(chat_body(keep_alive=True), "keep_alive", id="keep-alive-bool"),
    pytest.param(chat_body(keep_alive=[5]), "keep_alive", id="keep-alive-list"),
    pytest.param(chat_body(keep_alive=float("nan")), "keep_alive", id="keep-alive-nan"),
    pytest.param(chat_body(options={"keep_alive": "x"}), "keep_alive", id="keep-alive-in-opts"),
    pytest.param(chat_body(think="extreme"), "think", id="think-unknown-level"),
    pytest.param(chat_body(think="true"), "think", id="think-string-true"),
    pytest.param(chat_body(think=1), "think", id="think-number"),
    pytest.param(chat_body(options={"think": "hard"}), "think", id="think-in-options"),
    pytest.param(chat_body(format="xml"), "format", id="format-word"),
    pytest.param(chat_body(format=3), "format", id="format-number"),
    pytest.param(chat_body(format="[1, 2]"), "format", id="format-json-list"),
    pytest.param(chat_body(format=["json"]), "format", id="format-list"),
    pytest.param(chat_body(tools={"type": "function"}), "tools", id="tools-object"),
    pytest.param(chat_body(tools=["get_weather"]), "tools", id="tools-strings"),
    pytest.param(chat_body(system=["x"]), "system must be a string", id="system-list"),
    pytest.param(chat_body(options={"system": 1}), "system must be a string", id="system-opts"),
    pytest.param(chat_body(top_logprobs=21), "top_logprobs", id="top-logprobs-high"),
    pytest.param(chat_body(top_logprobs=-1), "top_logprobs", id="top-logprobs-low"),
]


@pytest.mark.parametrize(("body", "named"), INVALID_CHAT_BODIES)
def test_invalid_chat_body_raises_invalid_request_naming_the_field(
    body: object, named: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        chat_request_from_ollama(body)
    assert named in caught.value.message
    error_body, status = ollama_error_body(caught.value)
    assert status == 400
    assert error_body == {"error": caught.value.message}


def test_missing_model_message_matches_ollama_exactly() -> None:
    with pytest.raises(InvalidRequest) as caught:
        chat_request_from_ollama({"messages": [USER]})
    assert ollama_error_body(caught.value) == ({"error": "model is required"}, 400)


def test_error_body_keeps_each_status() -> None:
    assert ollama_error_body(UnknownModel("model 'x' not found")) == (
        {"error": "model 'x' not found"},
        404,
    )
    assert ollama_error_body(RateLimited("slow down", retry_after=5)) == (
        {"error": "slow down"},
        429,
    )


def test_plain_chat_body_becomes_a_chat_request() -> None:
    request = chat_request_from_ollama(
        chat_body(
            messages=[
                {"role": "system", "content": "be short"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "thinking": "hmm"},
            ]
        )
    )
    assert request.model == MODEL
    assert request.kind == "chat"
    assert [m.role for m in request.messages] == ["system", "user", "assistant"]
    assert request.messages[2].content == ""
    assert request.messages[2].thinking == "hmm"
    assert request.user_texts() == ["hi"]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [({}, True), ({"stream": None}, True), ({"stream": True}, True), ({"stream": False}, False)],
)
def test_stream_defaults_to_true_like_ollama(fields: dict[str, Any], expected: bool) -> None:
    assert chat_request_from_ollama(chat_body(**fields)).stream is expected
    generate = generate_request_from_ollama({"model": MODEL, "prompt": "x", **fields})
    assert generate.stream is expected


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("300ms", 0.3),
        ("10s", 10.0),
        ("1.5h", 5400.0),
        ("2h45m30.5s", 9930.5),
        ("1m30s500ms", 90.5),
        ("10us", 1e-5),
        ("10µs", 1e-5),
        ("100ns", 1e-7),
        ("300", 300.0),
        ("2.5", 2.5),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("-1", -1.0),
        ("-1m", -60.0),
        (300, 300.0),
        (1800, 1800.0),
        (1.5, 1.5),
        (0, 0.0),
        (-1, -1.0),
        (None, None),
        ("", None),
    ],
)
def test_keep_alive_accepts_every_ollama_form(value: object, seconds: float | None) -> None:
    assert keep_alive_seconds(value) == pytest.approx(seconds)
    request = chat_request_from_ollama(chat_body(keep_alive=value))
    assert request.keep_alive == pytest.approx(seconds)
    assert isinstance(request.keep_alive, (float, type(None)))


def test_options_are_validated_kept_and_unknown_keys_dropped() -> None:
    request = chat_request_from_ollama(
        chat_body(
            options={
                "num_predict": 128,
                "num_ctx": 4096.0,
                "temperature": 0,
                "top_p": 0.9,
                "seed": 42,
                "stop": "<|end|>",
                "use_mmap": True,
                "top_k": None,
                "made_up_option": {"x": 1},
                "max_tokens": 5,
            }
        )
    )
    assert request.options == {
        "num_predict": 128,
        "num_ctx": 4096,
        "temperature": 0,
        "top_p": 0.9,
        "seed": 42,
        "stop": ["<|end|>"],
        "use_mmap": True,
    }
    assert isinstance(request.options["num_ctx"], int)


def test_stop_list_is_kept_and_empty_stop_string_dropped() -> None:
    assert chat_request_from_ollama(chat_body(options={"stop": ["a", "b"]})).options == {
        "stop": ["a", "b"]
    }
    assert chat_request_from_ollama(chat_body(options={"stop": ""})).options == {}


def test_litellm_style_keys_are_lifted_out_of_options() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    request = chat_request_from_ollama(
        chat_body(
            options={
                "think": "high",
                "format": json.dumps(schema),
                "keep_alive": "10m",
                "system": "be brief",
                "temperature": 0.2,
            }
        )
    )
    assert request.think == "high"
    assert request.format == schema
    assert request.keep_alive == 600.0
    assert request.messages[0] == Message(role="system", content="be brief")
    assert request.messages[1].role == "user"
    assert request.options == {"temperature": 0.2}


def test_top_level_values_win_over_the_same_keys_in_options() -> None:
    request = chat_request_from_ollama(
        chat_body(think=False, format="json", keep_alive=0, options={"think": True, "format": {}})
    )
    assert request.think is False
    assert request.format == "json"
    assert request.keep_alive == 0.0


def test_top_level_system_becomes_the_leading_system_message() -> None:
    request = chat_request_from_ollama(chat_body(system="you are terse"))
    assert request.messages[0] == Message(role="system", content="you are terse")
    assert request.messages[1].content == "hi"


@pytest.mark.parametrize("think", [True, False, "low", "medium", "high", "max", None])
def test_think_accepts_ollama_values(think: object) -> None:
    assert chat_request_from_ollama(chat_body(think=think)).think == think


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("json", "json"),
        ({"type": "object"}, {"type": "object"}),
        ('{"type": "object"}', {"type": "object"}),
        ("", None),
        (None, None),
    ],
)
def test_format_accepts_json_and_schemas(value: object, expected: object) -> None:
    assert chat_request_from_ollama(chat_body(format=value)).format == expected


def test_images_lose_their_data_url_prefix() -> None:
    request = chat_request_from_ollama(
        message_body(images=["data:image/png;base64,iVBORw0KGgo=", "R0lGODlh"])
    )
    assert request.messages[0].images == ["iVBORw0KGgo=", "R0lGODlh"]


def test_tool_calls_parse_with_objects_or_json_strings_and_keep_ids() -> None:
    request = chat_request_from_ollama(
        chat_body(
            messages=[
                USER,
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"function": {"name": "a", "arguments": {"x": 1}}},
                        {
                            "id": "call_b",
                            "index": 5,
                            "function": {"name": "b", "arguments": '{"y": 2}'},
                        },
                        {"function": {"index": 7, "name": "c"}},
                    ],
                },
                {"role": "tool", "content": "sunny", "tool_name": "a", "tool_call_id": "call_b"},
            ]
        )
    )
    calls = request.messages[1].tool_calls
    assert calls == [
        ToolCall(name="a", arguments={"x": 1}, id=None, index=0),
        ToolCall(name="b", arguments={"y": 2}, id="call_b", index=5),
        ToolCall(name="c", arguments={}, id=None, index=7),
    ]
    tool_turn = request.messages[2]
    assert (tool_turn.tool_name, tool_turn.tool_call_id) == ("a", "call_b")


def test_tools_pass_through_and_empty_tools_mean_none() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert chat_request_from_ollama(chat_body(tools=[tool])).tools == [tool]
    assert chat_request_from_ollama(chat_body(tools=[])).tools is None


def test_unknown_top_level_fields_are_ignored() -> None:
    request = chat_request_from_ollama(
        chat_body(metadata={"chat_id": "1"}, truncate=True, shift=False, logprobs=True)
    )
    assert request.messages[0].content == "hi"


@pytest.mark.parametrize(
    "body",
    [
        {"model": MODEL},
        {"model": MODEL, "messages": []},
        {"model": MODEL, "messages": None, "keep_alive": 0},
        {"model": MODEL, "messages": [], "system": "stay a probe"},
    ],
)
def test_empty_chat_is_a_load_probe(body: dict[str, Any]) -> None:
    request = chat_request_from_ollama(body)
    assert request.messages == []
    assert is_load_probe(request)


def test_chat_with_messages_is_not_a_probe() -> None:
    assert not is_load_probe(chat_request_from_ollama(chat_body()))


# ---------------------------------------------------------------------------------------------
# /api/generate requests
# ---------------------------------------------------------------------------------------------


INVALID_GENERATE_BODIES = [
    pytest.param({"prompt": "x"}, "model is required", id="model-missing"),
    pytest.param({"model": MODEL, "prompt": 5}, "prompt must be a string", id="prompt-number"),
    pytest.param({"model": MODEL, "prompt": "x", "suffix": 1}, "suffix", id="suffix-number"),
    pytest.param({"model": MODEL, "prompt": "x", "raw": "yes"}, "raw", id="raw-string"),
    pytest.param({"model": MODEL, "prompt": "x", "images": [1]}, "images", id="images-numbers"),
    pytest.param({"model": MODEL, "prompt": "x", "context": ["a"]}, "context", id="context-strs"),
    pytest.param({"model": MODEL, "prompt": "x", "template": 1}, "template", id="template-number"),
    pytest.param({"model": MODEL, "prompt": "x", "options": 1}, "options", id="options-number"),
    pytest.param({"model": MODEL, "prompt": "x", "think": "big"}, "think", id="think-bad"),
    pytest.param(
        {"model": MODEL, "prompt": "x", "raw": True, "system": "s"}, "raw mode", id="raw-system"
    ),
    pytest.param(
        {"model": MODEL, "prompt": "x", "raw": True, "template": "{{ .Prompt }}"},
        "raw mode",
        id="raw-template",
    ),
    pytest.param(
        {"model": MODEL, "prompt": "x", "raw": True, "context": [1, 2]},
        "raw mode",
        id="raw-context",
    ),
    pytest.param(
        {"model": MODEL, "prompt": "x", "raw": True, "options": {"system": "s"}},
        "raw mode",
        id="raw-system-in-options",
    ),
]


@pytest.mark.parametrize(("body", "named"), INVALID_GENERATE_BODIES)
def test_invalid_generate_body_raises(body: object, named: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        generate_request_from_ollama(body)
    assert named in caught.value.message
    assert ollama_error_body(caught.value)[1] == 400


def test_raw_conflict_uses_ollamas_message() -> None:
    with pytest.raises(InvalidRequest) as caught:
        generate_request_from_ollama({"model": MODEL, "prompt": "x", "raw": True, "system": "s"})
    assert caught.value.message == "raw mode does not support template, system, or context"


def test_generate_body_becomes_a_completion_request_with_messages() -> None:
    request = generate_request_from_ollama(
        {
            "model": MODEL,
            "prompt": "def add(a, b):",
            "suffix": "\n\nprint(add(1, 2))",
            "system": "complete code",
            "images": ["data:image/jpeg;base64,/9j/4AAQ"],
            "options": {"num_predict": 64, "temperature": 0},
            "keep_alive": 1800,
            "format": "json",
            "think": False,
            "context": [1, 2, 3],
        }
    )
    assert request.kind == "completion"
    assert request.prompt == "def add(a, b):"
    assert request.suffix == "\n\nprint(add(1, 2))"
    assert request.raw is False
    assert request.messages == [
        Message(role="system", content="complete code"),
        Message(role="user", content="def add(a, b):", images=["/9j/4AAQ"]),
    ]
    assert request.options == {"num_predict": 64, "temperature": 0}
    assert request.keep_alive == 1800.0
    assert (request.format, request.think) == ("json", False)
    assert request.user_texts() == ["def add(a, b):"]
    assert not is_load_probe(request)


def test_continue_fim_raw_body_is_accepted() -> None:
    request = generate_request_from_ollama(
        {
            "model": MODEL,
            "prompt": "<PRE> x <SUF> y <MID>",
            "raw": True,
            "options": {"stop": ["<EOT>"]},
            "keep_alive": 1800,
        }
    )
    assert request.raw is True
    assert request.stream is True
    assert request.options == {"stop": ["<EOT>"]}


@pytest.mark.parametrize(
    "body",
    [
        {"model": MODEL},
        {"model": MODEL, "prompt": ""},
        {"model": MODEL, "prompt": None, "keep_alive": 0},
        {"model": MODEL, "prompt": "", "system": "s"},
    ],
)
def test_empty_prompt_is_a_load_probe(body: dict[str, Any]) -> None:
    request = generate_request_from_ollama(body)
    assert request.prompt == ""
    assert is_load_probe(request)
    assert all(m.role != "user" for m in request.messages)


# ---------------------------------------------------------------------------------------------
# Load probes and simple answers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("unload", "reason"), [(False, "load"), (True, "unload")])
def test_chat_load_response_is_a_complete_chat_response(unload: bool, reason: str) -> None:
    body = ollama_load_response(MODEL, "chat", unload)
    assert body["message"] == {"role": "assistant", "content": ""}
    assert (body["done"], body["done_reason"], body["model"]) == (True, reason, MODEL)
    assert "response" not in body
    assert datetime.fromisoformat(body["created_at"]).tzinfo is not None
    parsed = ollama_types.ChatResponse.model_validate(body)
    assert parsed.message.role == "assistant"


@pytest.mark.parametrize(("unload", "reason"), [(False, "load"), (True, "unload")])
def test_generate_load_response_has_empty_response(unload: bool, reason: str) -> None:
    body = ollama_load_response(MODEL, "completion", unload)
    assert (body["response"], body["done"], body["done_reason"]) == ("", True, reason)
    assert "message" not in body
    ollama_types.GenerateResponse.model_validate(body)


def test_version_body() -> None:
    assert ollama_version("0.12.0") == {"version": "0.12.0"}


# ---------------------------------------------------------------------------------------------
# /api/chat answers
# ---------------------------------------------------------------------------------------------

USAGE = Usage(
    prompt_tokens=12,
    completion_tokens=3,
    total_duration_ns=1_200_000_000,
    load_duration_ns=1_000_000,
    prompt_eval_duration_ns=50_000_000,
    eval_duration_ns=900_000_000,
)
METRIC_KEYS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)


def sample_events() -> list[ChatEvent]:
    return [
        ThinkingDelta("let me think"),
        TextDelta("Hel"),
        TextDelta("lo"),
        ToolCallDelta(weather_call(0, "call_1")),
        ToolCallDelta(ToolCall(name="get_time", arguments={}, id=None, index=1)),
        Done("stop", USAGE),
    ]


def test_ndjson_framing_every_line_is_a_full_chat_response() -> None:
    lines = list(ollama_ndjson_from_events(sample_events(), model=MODEL))
    assert len(lines) == 6
    for line in lines:
        assert line.endswith("\n") and not line.endswith("\n\n")
        assert line.count("\n") == 1
        assert line.strip()
        compact = json.dumps(json.loads(line), separators=(",", ":"), ensure_ascii=False)
        assert line == compact + "\n"
        obj = json.loads(line)
        assert obj["model"] == MODEL
        assert obj["message"]["role"] == "assistant"
        assert "done" in obj
        assert datetime.fromisoformat(obj["created_at"]).utcoffset() is not None
        ollama_types.ChatResponse.model_validate(obj)
    objs = parse_lines(lines)
    assert [o["done"] for o in objs] == [False] * 5 + [True]
    assert objs[0]["message"] == {"role": "assistant", "content": "", "thinking": "let me think"}
    assert [o["message"]["content"] for o in objs[1:3]] == ["Hel", "lo"]


def test_ndjson_final_line_carries_metrics_and_empty_message() -> None:
    final = parse_lines(list(ollama_ndjson_from_events(sample_events(), model=MODEL)))[-1]
    assert final["message"] == {"role": "assistant", "content": ""}
    assert final["done_reason"] == "stop"
    assert final["total_duration"] == 1_200_000_000
    assert final["load_duration"] == 1_000_000
    assert final["prompt_eval_count"] == 12
    assert final["prompt_eval_duration"] == 50_000_000
    assert final["eval_count"] == 3
    assert final["eval_duration"] == 900_000_000


def test_tool_calls_go_out_with_object_arguments() -> None:
    objs = parse_lines(list(ollama_ndjson_from_events(sample_events(), model=MODEL)))
    first, second = objs[3]["message"]["tool_calls"], objs[4]["message"]["tool_calls"]
    assert first == [
        {
            "id": "call_1",
            "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Tokyo"}},
        }
    ]
    assert second == [{"function": {"index": 1, "name": "get_time", "arguments": {}}}]
    parsed = ollama_types.ChatResponse.model_validate(objs[3])
    assert parsed.message.tool_calls is not None
    assert dict(parsed.message.tool_calls[0].function.arguments) == {"city": "Tokyo"}


def test_metrics_are_non_zero_integers_when_the_backend_reports_none() -> None:
    for lines in (
        list(ollama_ndjson_from_events([Done()], model=MODEL)),
        list(ollama_generate_ndjson_from_events([Done()], model=MODEL)),
    ):
        final = json.loads(lines[-1])
        for key in METRIC_KEYS:
            assert type(final[key]) is int and final[key] >= 1, key
    single = ollama_chat_from_events([TextDelta("x"), Done()], model=MODEL)
    for key in METRIC_KEYS:
        assert type(single[key]) is int and single[key] >= 1, key


def test_unreported_durations_are_measured() -> None:
    def slow_events() -> Iterator[ChatEvent]:
        time.sleep(0.02)
        yield TextDelta("a")
        time.sleep(0.03)
        yield Done()

    final = json.loads(list(ollama_ndjson_from_events(slow_events(), model=MODEL))[-1])
    assert final["total_duration"] >= 50_000_000
    assert final["prompt_eval_duration"] >= 20_000_000
    assert final["eval_duration"] >= 30_000_000
    assert final["total_duration"] >= final["prompt_eval_duration"] + final["eval_duration"]


@pytest.mark.parametrize(
    ("reason", "wire"),
    [("stop", "stop"), ("length", "length"), ("tool_calls", "stop"), ("load", "load")],
)
def test_done_reason_on_the_wire(reason: Any, wire: str) -> None:
    final = json.loads(list(ollama_ndjson_from_events([Done(reason)], model=MODEL))[-1])
    assert final["done_reason"] == wire
    assert ollama_chat_from_events([Done(reason)], model=MODEL)["done_reason"] == wire


def failing_after_text(exc: Exception) -> Iterator[ChatEvent]:
    yield TextDelta("partial")
    raise exc


def test_mid_stream_failure_becomes_one_generic_error_line() -> None:
    lines = list(
        ollama_ndjson_from_events(
            failing_after_text(RuntimeError("secret /etc/path token=abc")), model=MODEL
        )
    )
    assert len(lines) == 2
    assert json.loads(lines[0])["message"]["content"] == "partial"
    error = json.loads(lines[1])
    assert list(error) == ["error"]
    assert error["error"]
    assert "secret" not in lines[1] and "token" not in lines[1]
    assert lines[1].endswith("}\n")


def test_mid_stream_request_error_keeps_its_client_message() -> None:
    lines = list(
        ollama_ndjson_from_events(failing_after_text(RateLimited("rate limit hit")), model=MODEL)
    )
    assert json.loads(lines[-1]) == {"error": "rate limit hit"}


def test_failure_before_any_event_is_still_a_single_error_line() -> None:
    def broken() -> Iterator[ChatEvent]:
        raise ValueError("boom")
        yield  # pragma: no cover

    lines = list(ollama_generate_ndjson_from_events(broken(), model=MODEL))
    assert len(lines) == 1
    assert "boom" not in lines[0]
    assert set(json.loads(lines[0])) == {"error"}


def test_stream_without_done_ends_with_an_error_line() -> None:
    lines = list(ollama_ndjson_from_events([TextDelta("a")], model=MODEL))
    assert len(lines) == 2
    assert "error" in json.loads(lines[-1])


def test_events_after_done_are_not_sent() -> None:
    lines = list(ollama_ndjson_from_events([Done(), TextDelta("AFTER-DONE")], model=MODEL))
    assert len(lines) == 1
    assert "AFTER-DONE" not in lines[0]


def test_closing_the_stream_closes_the_event_source() -> None:
    closed: list[bool] = []

    def events() -> Iterator[ChatEvent]:
        try:
            while True:
                yield TextDelta("tok")
        finally:
            closed.append(True)

    stream = ollama_ndjson_from_events(events(), model=MODEL)
    assert json.loads(next(stream))["message"]["content"] == "tok"
    stream.close()  # type: ignore[attr-defined]
    assert closed == [True]


def test_empty_text_deltas_send_no_line() -> None:
    lines = list(ollama_ndjson_from_events([TextDelta(""), ThinkingDelta(""), Done()], model=MODEL))
    assert len(lines) == 1


def test_non_streaming_chat_is_one_full_object() -> None:
    body = ollama_chat_from_events(sample_events(), model=MODEL)
    assert body["model"] == MODEL
    assert body["done"] is True and body["done_reason"] == "stop"
    assert body["message"]["role"] == "assistant"
    assert body["message"]["content"] == "Hello"
    assert body["message"]["thinking"] == "let me think"
    assert [c["function"]["arguments"] for c in body["message"]["tool_calls"]] == [
        {"city": "Tokyo"},
        {},
    ]
    assert body["eval_count"] == 3
    parsed = ollama_types.ChatResponse.model_validate(body)
    assert parsed.message.content == "Hello"
    assert "thinking" not in ollama_chat_from_events([Done()], model=MODEL)["message"]


def test_non_streaming_chat_lets_exceptions_propagate() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        ollama_chat_from_events(failing_after_text(RuntimeError("boom")), model=MODEL)
    with pytest.raises(ExpertStreamBroken):
        ollama_chat_from_events([TextDelta("no done")], model=MODEL)


# ---------------------------------------------------------------------------------------------
# /api/generate answers
# ---------------------------------------------------------------------------------------------


def test_generate_ndjson_lines_use_response_and_end_with_context() -> None:
    lines = list(ollama_generate_ndjson_from_events(sample_events(), model=MODEL))
    objs = parse_lines(lines)
    # Tool calls have no place in /api/generate: thinking, two text pieces, final.
    assert len(objs) == 4
    for line, obj in zip(lines, objs, strict=True):
        assert line.count("\n") == 1 and line.endswith("\n")
        assert obj["model"] == MODEL and "done" in obj and "message" not in obj
        ollama_types.GenerateResponse.model_validate(obj)
    assert objs[0] == {**objs[0], "response": "", "thinking": "let me think", "done": False}
    assert [o["response"] for o in objs[1:3]] == ["Hel", "lo"]
    final = objs[-1]
    assert final["done"] is True and final["done_reason"] == "stop" and final["response"] == ""
    # Ollama's integration test fails an empty context.
    assert isinstance(final["context"], list) and final["context"]
    assert all(type(t) is int for t in final["context"])
    for key in METRIC_KEYS:
        assert type(final[key]) is int and final[key] >= 1


def test_generate_mid_stream_failure_is_an_error_line() -> None:
    lines = list(
        ollama_generate_ndjson_from_events(failing_after_text(OSError("disk gone")), model=MODEL)
    )
    assert json.loads(lines[0])["response"] == "partial"
    assert set(json.loads(lines[1])) == {"error"}
    assert "disk" not in lines[1]


def test_non_streaming_generate_is_one_full_object() -> None:
    body = ollama_generate_from_events(
        [ThinkingDelta("hm"), TextDelta("4"), TextDelta("2"), Done("length", USAGE)], model=MODEL
    )
    assert (body["response"], body["thinking"], body["done_reason"]) == ("42", "hm", "length")
    assert body["context"]
    assert body["prompt_eval_count"] == 12
    ollama_types.GenerateResponse.model_validate(body)
    with pytest.raises(ValueError):
        ollama_generate_from_events(failing_after_text(ValueError("bad")), model=MODEL)


# ---------------------------------------------------------------------------------------------
# Listings
# ---------------------------------------------------------------------------------------------


def test_tags_list_tagged_names_under_name_and_model() -> None:
    body = ollama_tags([card(), card(name="traductor:latest", format="remote", size=1)])
    assert [m["name"] for m in body["models"]] == [MODEL, "traductor:latest"]
    first = body["models"][0]
    assert first["model"] == first["name"] == MODEL
    assert first["size"] == 123456 and first["digest"] == "ab" * 32
    assert datetime.fromisoformat(first["modified_at"]).timestamp() == 1767225600.0
    assert first["details"] == {
        "parent_model": "",
        "format": "gguf",
        "family": "lemoe",
        "families": ["lemoe"],
        "parameter_size": "135M",
        "quantization_level": "Q4_1",
    }
    parsed = ollama_types.ListResponse.model_validate(body)
    assert parsed.models[0].model == MODEL
    assert parsed.models[0].details is not None and parsed.models[0].details.family == "lemoe"
    assert ollama_tags([]) == {"models": []}


def test_tags_carry_each_models_capabilities() -> None:
    body = ollama_tags([card(), card(name="eyes:latest", capabilities=("completion", "vision"))])
    assert [m["capabilities"] for m in body["models"]] == [["completion", "tools"], ["completion", "vision"]]
    parsed = ollama_types.ListResponse.model_validate(body)  # an extra field the client ignores
    assert [m.model for m in parsed.models] == [MODEL, "eyes:latest"]


def test_show_has_model_info_template_and_parameters_for_clients() -> None:
    body = ollama_show(card())
    assert body["model_info"] == {"general.architecture": "lemoe", "lemoe.context_length": 8192}
    template = body["template"]
    for marker in ("{{ .System }}", "{{ .Tools }}", "{{ .Prompt }}"):
        assert marker in template
    assert "tools" in template.lower()  # LiteLLM's test for native tool support
    assert ".Suffix" not in template  # no "insert" capability: Continue must not use FIM
    # Continue splits each parameters line on whitespace.
    assert body["parameters"].split() == ["num_ctx", "8192"]
    assert body["parameters"] == "num_ctx" + " " * 24 + "8192"
    assert body["capabilities"] == ["completion", "tools"]
    assert MODEL in body["modelfile"] and "# Writes code." in body["modelfile"]
    assert "num_ctx 8192" in body["modelfile"]
    parsed = ollama_types.ShowResponse.model_validate(body)
    assert parsed.modelinfo == body["model_info"]
    assert parsed.modified_at is not None and parsed.modified_at.timestamp() == 1767225600.0


def test_show_template_has_suffix_only_with_insert_and_tools_only_with_tools() -> None:
    with_insert = ollama_show(card(capabilities=("completion", "tools", "insert")))
    assert "{{ .Suffix }}" in with_insert["template"]
    assert "insert" in with_insert["capabilities"]
    plain = ollama_show(card(capabilities=("completion",)))
    assert "tools" not in plain["template"].lower()
    assert "{{ .Prompt }}" in plain["template"]


def test_ps_lists_loaded_models_with_expiry() -> None:
    body = ollama_ps([(card(), 1767229200.5, 4096)])
    entry = body["models"][0]
    assert entry["name"] == entry["model"] == MODEL
    assert datetime.fromisoformat(entry["expires_at"]).timestamp() == 1767229200.5
    assert entry["size_vram"] == 4096
    assert entry["context_length"] == 8192
    assert entry["digest"] == "ab" * 32 and entry["details"]["format"] == "gguf"
    parsed = ollama_types.ProcessResponse.model_validate(body)
    assert parsed.models[0].context_length == 8192
    assert ollama_ps([]) == {"models": []}


# ---------------------------------------------------------------------------------------------
# Client side: bodies for an upstream Ollama
# ---------------------------------------------------------------------------------------------


def rich_chat_request() -> ChatRequest:
    return ChatRequest(
        model="lemoe",
        messages=[
            Message(role="system", content="be brief"),
            Message(role="user", content="weather?", images=["iVBORw0KGgo="]),
            Message(
                role="assistant",
                content="",
                thinking="need a tool",
                tool_calls=[weather_call(0, "call_1"), ToolCall("get_time", {}, None, 1)],
            ),
            Message(role="tool", content="sunny", tool_name="get_weather", tool_call_id="call_1"),
        ],
        stream=False,
        options={"num_predict": 100, "temperature": 0.5, "stop": ["\n\n"]},
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
        format={"type": "object"},
        think="low",
        keep_alive=-1.0,
    )


def test_chat_body_is_ollama_shaped_and_always_streams() -> None:
    body = ollama_chat_body_from_request(rich_chat_request(), "qwen3:0.6b")
    assert body["model"] == "qwen3:0.6b"
    assert body["stream"] is True
    assert body["messages"][0] == {"role": "system", "content": "be brief"}
    assert body["messages"][1]["images"] == ["iVBORw0KGgo="]
    assistant = body["messages"][2]
    assert assistant["tool_calls"][0]["function"]["arguments"] == {"city": "Tokyo"}
    assert assistant["thinking"] == "need a tool"
    assert body["messages"][3]["tool_name"] == "get_weather"
    assert body["messages"][3]["tool_call_id"] == "call_1"
    assert body["options"] == {"num_predict": 100, "temperature": 0.5, "stop": ["\n\n"]}
    assert (body["format"], body["think"], body["keep_alive"]) == ({"type": "object"}, "low", -1.0)
    assert body["tools"][0]["function"]["name"] == "get_weather"
    ollama_types.ChatRequest.model_validate(body)
    json.dumps(body)  # must be serialisable as is


def test_chat_body_leaves_out_unset_fields() -> None:
    body = ollama_chat_body_from_request(
        ChatRequest(model=None, messages=[Message("user", "hi")]), "m"
    )
    assert body == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def test_chat_body_round_trips_through_our_own_parser() -> None:
    original = rich_chat_request()
    parsed = chat_request_from_ollama(ollama_chat_body_from_request(original, "qwen3:0.6b"))
    assert parsed.messages == original.messages
    assert parsed.options == original.options
    assert parsed.tools == original.tools
    assert (parsed.format, parsed.think, parsed.keep_alive) == (original.format, "low", -1.0)
    assert parsed.model == "qwen3:0.6b" and parsed.stream is True


def test_generate_body_for_fim_and_system() -> None:
    request = generate_request_from_ollama(
        {
            "model": MODEL,
            "prompt": "def f(",
            "suffix": "):",
            "system": "code only",
            "images": ["R0lGODlh"],
            "options": {"num_predict": 32},
            "think": True,
            "keep_alive": "30m",
            "stream": False,
        }
    )
    body = ollama_generate_body_from_request(request, "qwen2.5-coder:1.5b")
    assert body == {
        "model": "qwen2.5-coder:1.5b",
        "prompt": "def f(",
        "suffix": "):",
        "system": "code only",
        "images": ["R0lGODlh"],
        "options": {"num_predict": 32},
        "think": True,
        "keep_alive": 1800.0,
        "stream": True,
    }
    # ollama-python's request type holds images as its own Image objects, not wire strings.
    ollama_types.GenerateRequest.model_validate({**body, "images": None})
    again = generate_request_from_ollama(body)
    assert (again.prompt, again.suffix, again.messages) == (
        request.prompt,
        request.suffix,
        request.messages,
    )


def test_generate_body_in_raw_mode_never_sends_system() -> None:
    request = ChatRequest(
        model=MODEL,
        messages=[Message("system", "ignored"), Message("user", "<PRE> a")],
        kind="completion",
        prompt="<PRE> a",
        raw=True,
    )
    body = ollama_generate_body_from_request(request, "m")
    assert body["raw"] is True and "system" not in body
    generate_request_from_ollama(body)  # Ollama's raw rules hold, so no 400


def test_generate_body_from_a_chat_request_uses_the_last_user_turn() -> None:
    request = ChatRequest(
        model=None, messages=[Message("user", "first"), Message("user", "second")]
    )
    assert ollama_generate_body_from_request(request, "m")["prompt"] == "second"


# ---------------------------------------------------------------------------------------------
# Client side: parsing an upstream NDJSON stream
# ---------------------------------------------------------------------------------------------


def test_upstream_chat_stream_becomes_events() -> None:
    lines: list[bytes | str] = [
        b'{"model":"q","created_at":"t","message":{"role":"assistant","content":"","thinking":"hm"},"done":false}\n',
        b"\n",
        '{"model":"q","message":{"role":"assistant","content":"Hi"},"done":false}',
        "   ",
        json.dumps(
            {
                "model": "q",
                "message": {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"function": {"name": "a", "arguments": {"x": 1}}},
                        {"id": "call_9", "function": {"name": "b", "arguments": {}}},
                    ],
                },
                "done": False,
            }
        ),
        json.dumps(
            {
                "model": "q",
                "message": {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"function": {"name": "c", "arguments": {}}}],
                },
                "done": False,
            }
        ),
        json.dumps(
            {
                "model": "q",
                "message": {"role": "assistant", "content": ""},
                "done": True,
                "done_reason": "stop",
                "total_duration": 10,
                "load_duration": 2,
                "prompt_eval_count": 7,
                "prompt_eval_duration": 3,
                "eval_count": 4,
                "eval_duration": 5,
            }
        ).encode(),
        b'{"model":"q","message":{"role":"assistant","content":"after done"},"done":false}',
    ]
    events = list(events_from_ollama_ndjson(lines))
    assert events == [
        ThinkingDelta("hm"),
        TextDelta("Hi"),
        ToolCallDelta(ToolCall("a", {"x": 1}, None, 0)),
        ToolCallDelta(ToolCall("b", {}, "call_9", 1)),
        ToolCallDelta(ToolCall("c", {}, None, 2)),
        Done("stop", Usage(7, 4, 10, 2, 3, 5)),
    ]


def test_upstream_generate_stream_becomes_events() -> None:
    lines = [
        '{"model":"q","response":"","thinking":"plan","done":false}',
        '{"model":"q","response":"4","done":false}',
        '{"model":"q","response":"2","done":false}',
        '{"model":"q","response":"","done":true,"done_reason":"length","context":[1,2],"eval_count":2}',
    ]
    assert list(events_from_ollama_ndjson(lines)) == [
        ThinkingDelta("plan"),
        TextDelta("4"),
        TextDelta("2"),
        Done("length", Usage(completion_tokens=2)),
    ]


@pytest.mark.parametrize(
    ("upstream", "mapped"),
    [("stop", "stop"), ("length", "length"), ("load", "stop"), (None, "stop"), ("weird", "stop")],
)
def test_upstream_done_reason_mapping(upstream: object, mapped: str) -> None:
    line = json.dumps({"model": "q", "response": "", "done": True, "done_reason": upstream})
    assert list(events_from_ollama_ndjson([line])) == [Done(mapped)]  # type: ignore[arg-type]


def test_upstream_done_with_tool_calls_keeps_ollama_stop() -> None:
    line = json.dumps(
        {
            "model": "q",
            "message": {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "f", "arguments": {}}}],
            },
            "done": True,
            "done_reason": "stop",
        }
    )
    events = list(events_from_ollama_ndjson([line]))
    assert isinstance(events[0], ToolCallDelta)
    assert events[-1] == Done("stop")


@pytest.mark.parametrize(
    "lines",
    [
        pytest.param(
            ['{"model":"q","response":"a","done":false}', '{"error":"out of memory"}'],
            id="error-line",
        ),
        pytest.param(["{not json"], id="invalid-json"),
        pytest.param(['["a list"]'], id="not-an-object"),
        pytest.param(['{"model":"q","response":"a","done":false}'], id="no-done-line"),
        pytest.param([], id="empty-stream"),
        pytest.param(
            [
                '{"message":{"role":"assistant","content":"","tool_calls":[{"function":{"name":"f","arguments":"[1]"}}]},"done":false}'
            ],
            id="bad-tool-call",
        ),
        pytest.param(
            ['{"message":{"role":"assistant","content":"","tool_calls":"f"},"done":false}'],
            id="tool-calls-not-list",
        ),
    ],
)
def test_broken_upstream_streams_raise_expert_stream_broken(lines: list[str]) -> None:
    with pytest.raises(ExpertStreamBroken):
        list(events_from_ollama_ndjson(lines))


def test_upstream_error_message_is_kept_for_the_log() -> None:
    with pytest.raises(ExpertStreamBroken, match="out of memory"):
        list(events_from_ollama_ndjson(['{"error":"out of memory"}']))


def test_events_before_an_upstream_error_are_delivered_first() -> None:
    stream = events_from_ollama_ndjson(['{"response":"a","done":false}', '{"error":"x"}'])
    assert next(stream) == TextDelta("a")
    with pytest.raises(ExpertStreamBroken):
        next(stream)


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reason", ["stop", "length"])
def test_our_chat_ndjson_parses_back_to_the_same_events(reason: Any) -> None:
    events = [*sample_events()[:-1], Done(reason, USAGE)]
    lines = list(ollama_ndjson_from_events(events, model=MODEL))
    assert list(events_from_ollama_ndjson(lines)) == events
    as_bytes = [line.encode() for line in lines]
    assert list(events_from_ollama_ndjson(as_bytes)) == events


def test_our_generate_ndjson_parses_back_to_the_same_events() -> None:
    events: list[ChatEvent] = [
        ThinkingDelta("t"),
        TextDelta("a"),
        TextDelta("b"),
        Done("stop", USAGE),
    ]
    lines = list(ollama_generate_ndjson_from_events(events, model=MODEL))
    assert list(events_from_ollama_ndjson(lines)) == events


def test_our_non_streaming_chat_parses_back_as_a_single_done_line() -> None:
    body = ollama_chat_from_events(sample_events(), model=MODEL)
    events = list(events_from_ollama_ndjson([json.dumps(body)]))
    assert events == [
        ThinkingDelta("let me think"),
        TextDelta("Hello"),
        ToolCallDelta(weather_call(0, "call_1")),
        ToolCallDelta(ToolCall("get_time", {}, None, 1)),
        Done("stop", USAGE),
    ]


def test_our_error_line_parses_back_as_a_broken_stream() -> None:
    lines = list(ollama_ndjson_from_events(failing_after_text(RuntimeError("x")), model=MODEL))
    stream = events_from_ollama_ndjson(lines)
    assert next(stream) == TextDelta("partial")
    with pytest.raises(ExpertStreamBroken):
        next(stream)


def test_body_has_images_looks_at_messages_and_generate_images() -> None:
    from modules.protocol.ollama_protocol import body_has_images

    assert body_has_images({"messages": [{"role": "user", "content": "x"}, {"role": "user", "images": ["aGk="]}]})
    assert body_has_images({"prompt": "x", "images": ["aGk="]})
    for body in ({"messages": [{"role": "user", "images": []}]}, {"messages": "x"}, {"images": []}, [], "x",
                 {"messages": [["images"]]}):
        assert not body_has_images(body)

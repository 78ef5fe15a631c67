"""OpenAI wire protocol, both directions, with plain values and the real `openai` types."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types import Completion, Model
from openai.types import completion_create_params as text_params
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.chat import completion_create_params as chat_params
from openai.types.shared import ErrorObject
from pydantic import TypeAdapter

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
    BodyTooLarge,
    ExpertStreamBroken,
    ExpertTimeout,
    InvalidRequest,
    MethodNotAllowed,
    RateLimited,
    ServiceUnavailable,
    Unauthorized,
    UnknownModel,
)
from modules.protocol.openai_protocol import (
    STREAM_ERROR_MESSAGE,
    chat_request_from_openai,
    completion_request_from_openai,
    new_completion_id,
    openai_chat_body_from_request,
    openai_completion_body_from_request,
    openai_completion_from_events,
    openai_error_body,
    openai_model,
    openai_model_list,
    openai_sse_from_events,
    openai_text_completion_from_events,
    openai_text_sse_from_events,
)
from modules.protocol.openai_upstream import events_from_openai_sse

PNG_B64 = base64.b64encode(b"\x89PNG\r\n\x1a\n fake png bytes").decode()
JPEG_B64 = base64.b64encode(b"\xff\xd8\xff\xe0 fake jpeg bytes").decode()
USER = {"role": "user", "content": "hello"}
IDS = {"model": "expert-code:latest", "completion_id": "chatcmpl-test", "created": 1767225600}


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [USER], **fields}


def sse_payloads(text_events: list[str]) -> list[Any]:
    """Each SSE event's JSON payload (the string "[DONE]" for the terminator)."""
    out = []
    for event in text_events:
        assert event.startswith("data: ") and event.endswith("\n\n"), event
        data = event[len("data: ") : -2]
        assert "\n" not in data
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def lines_of(text_events: list[str], as_bytes: bool = True) -> list[bytes | str]:
    """What `requests.Response.iter_lines()` yields for this SSE text."""
    lines = "".join(text_events).split("\n")
    return [line.encode() for line in lines] if as_bytes else list(lines)


def invalid(payload: object, parse: Any = chat_request_from_openai) -> str:
    with pytest.raises(InvalidRequest) as info:
        parse(payload)
    assert info.value.status_code == 400
    return info.value.message


# Module level: pydantic's lazy validators need their adapter alive while they are consumed.
CHAT_STREAMING = TypeAdapter(chat_params.CompletionCreateParamsStreaming)
CHAT_NON_STREAMING = TypeAdapter(chat_params.CompletionCreateParamsNonStreaming)


def materialize(value: Any) -> Any:
    """Force pydantic's lazy Iterable validators so a TypedDict check really runs."""
    if isinstance(value, dict):
        return {k: materialize(v) for k, v in value.items()}
    if isinstance(value, (str, bytes, int, float, bool)) or value is None:
        return value
    return [materialize(v) for v in value]


# ---------------------------------------------------------------------------------------------
# chat_request_from_openai
# ---------------------------------------------------------------------------------------------


def test_minimal_chat_body_defaults_to_no_stream() -> None:
    req = chat_request_from_openai(body())
    assert req == ChatRequest(model="m", messages=[Message(role="user", content="hello")])
    assert req.stream is False and req.kind == "chat" and req.options == {}


def test_roles_developer_becomes_system_and_function_becomes_tool() -> None:
    req = chat_request_from_openai(
        body(
            messages=[
                {"role": "developer", "content": "be brief"},
                {"role": "system", "content": "sys"},
                USER,
                {"role": "function", "name": "lookup", "content": "42"},
            ]
        )
    )
    assert [m.role for m in req.messages] == ["system", "system", "user", "tool"]
    assert req.messages[3].tool_name == "lookup" and req.messages[3].content == "42"


def test_unknown_fields_are_ignored() -> None:
    req = chat_request_from_openai(
        body(user="u1", metadata={"a": "b"}, store=True, logit_bias={"1": 2}, service_tier="auto", modalities=["text"])
    )
    assert req.model == "m" and len(req.messages) == 1


@pytest.mark.parametrize("payload", [[USER], "text", None, 3])
def test_body_must_be_an_object(payload: object) -> None:
    assert "JSON object" in invalid(payload)


def test_messages_missing_null_wrong_type_or_empty() -> None:
    assert "'messages'" in invalid({"model": "m"})
    assert "'messages'" in invalid({"model": "m", "messages": None})
    assert "'messages'" in invalid({"model": "m", "messages": "hi"})
    assert invalid({"model": "m", "messages": []}) == "[] is too short - 'messages'"


def test_message_not_an_object_names_its_index() -> None:
    assert "messages[1]" in invalid(body(messages=[USER, "hi"]))


@pytest.mark.parametrize("role", ["robot", None, 1, "USER"])
def test_invalid_role(role: object) -> None:
    assert "messages[0].role" in invalid(body(messages=[{"role": role, "content": "x"}]))


@pytest.mark.parametrize("content", [1, True, {"text": "x"}])
def test_content_of_wrong_type(content: object) -> None:
    assert "messages[0].content" in invalid(body(messages=[{"role": "user", "content": content}]))


def test_null_or_missing_content_is_empty_text() -> None:
    req = chat_request_from_openai(body(messages=[{"role": "assistant", "content": None}, {"role": "user"}]))
    assert [m.content for m in req.messages] == ["", ""]


def test_content_parts_flatten_text_and_collect_images() -> None:
    msg = {
        "role": "user",
        "content": [
            {"type": "text", "text": "what is"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}", "detail": "low"}},
            {"type": "input_audio", "input_audio": {"data": "xx", "format": "wav"}},
            {"type": "text", "text": "this?"},
            {"type": "image_url", "image_url": f"data:image/jpeg;base64,{JPEG_B64}"},
        ],
    }
    (parsed,) = chat_request_from_openai(body(messages=[msg])).messages
    assert parsed.content == "what is\nthis?"
    assert parsed.images == [PNG_B64, JPEG_B64]


@pytest.mark.parametrize(
    "part, where",
    [
        ("just text", "content[0]"),
        ({"type": "text", "text": 5}, "content[0].text"),
        ({"type": "text"}, "content[0].text"),
        ({"type": 3}, "content[0].type"),
        ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, "content[0].image_url.url"),
        (
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not base64@@"}},
            "content[0].image_url.url",
        ),
        ({"type": "image_url", "image_url": {}}, "content[0].image_url.url"),
    ],
)
def test_bad_content_parts(part: object, where: str) -> None:
    message = invalid(body(messages=[{"role": "user", "content": [part]}]))
    assert f"messages[0].{where}" in message


def test_assistant_tool_calls_are_parsed_and_tool_results_get_the_name() -> None:
    req = chat_request_from_openai(
        body(
            messages=[
                USER,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_a",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city":"Tokyo"}'},
                        },
                        {"id": "call_b", "type": "function", "function": {"name": "clock", "arguments": ""}},
                    ],
                },
                {"role": "tool", "tool_call_id": "call_b", "content": "12:00"},
                {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
            ]
        )
    )
    assistant, first, second = req.messages[1:]
    assert assistant.tool_calls == [
        ToolCall(name="weather", arguments={"city": "Tokyo"}, id="call_a", index=0),
        ToolCall(name="clock", arguments={}, id="call_b", index=1),
    ]
    assert (first.tool_call_id, first.tool_name) == ("call_b", "clock")
    assert (second.tool_call_id, second.tool_name) == ("call_a", "weather")


def test_legacy_function_call_becomes_a_tool_call() -> None:
    msg = {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": '{"x":1}'}}
    (parsed,) = chat_request_from_openai(body(messages=[msg])).messages
    assert parsed.tool_calls == [ToolCall(name="f", arguments={"x": 1})]


def test_assistant_reasoning_is_kept_as_thinking() -> None:
    msg = {"role": "assistant", "content": "4", "reasoning_content": "2+2"}
    assert chat_request_from_openai(body(messages=[msg])).messages[0].thinking == "2+2"


@pytest.mark.parametrize(
    "tool_calls, where",
    [
        ("call", "tool_calls"),
        (["call"], "tool_calls[0]"),
        ([{"id": "c"}], "tool_calls[0].function"),
        ([{"function": {"arguments": "{}"}}], "tool_calls[0].function.name"),
        ([{"function": {"name": "f", "arguments": "{not json"}}], "tool_calls[0].function.arguments"),
        ([{"function": {"name": "f", "arguments": "[1, 2]"}}], "tool_calls[0].function.arguments"),
        ([{"function": {"name": "f", "arguments": 12}}], "tool_calls[0].function.arguments"),
        ([{"id": 7, "function": {"name": "f", "arguments": "{}"}}], "tool_calls[0].id"),
    ],
)
def test_malformed_tool_calls(tool_calls: object, where: str) -> None:
    msg = {"role": "assistant", "content": None, "tool_calls": tool_calls}
    assert f"messages[0].{where}" in invalid(body(messages=[msg]))


def test_tool_call_id_must_be_a_string() -> None:
    assert "tool_call_id" in invalid(body(messages=[{"role": "tool", "tool_call_id": 5, "content": "x"}]))


@pytest.mark.parametrize("model, expected", [("x:latest", "x:latest"), ("", None), (None, None)])
def test_model_is_optional(model: object, expected: str | None) -> None:
    assert chat_request_from_openai(body(model=model)).model == expected
    assert chat_request_from_openai({"messages": [USER]}).model is None


def test_model_of_wrong_type() -> None:
    assert "'model'" in invalid(body(model=5))


def test_stream_must_be_a_boolean() -> None:
    assert chat_request_from_openai(body(stream=True)).stream is True
    assert chat_request_from_openai(body(stream=None)).stream is False
    assert "'stream'" in invalid(body(stream="yes"))
    assert "'stream'" in invalid(body(stream=1))


def test_sampling_numbers_map_onto_options() -> None:
    req = chat_request_from_openai(
        body(temperature=0.2, top_p=1, presence_penalty=-0.5, frequency_penalty=1.5, seed=42, max_tokens=64)
    )
    assert req.options == {
        "temperature": 0.2,
        "top_p": 1,
        "presence_penalty": -0.5,
        "frequency_penalty": 1.5,
        "seed": 42,
        "num_predict": 64,
    }


@pytest.mark.parametrize("key", ["temperature", "top_p", "presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [True, "0.5", [0.5]])
def test_sampling_numbers_reject_non_numbers(key: str, value: object) -> None:
    assert f"'{key}'" in invalid(body(**{key: value}))


@pytest.mark.parametrize(
    "key, value", [("temperature", 2.5), ("temperature", -0.1), ("top_p", 1.5), ("presence_penalty", -3)]
)
def test_sampling_numbers_out_of_range(key: str, value: float) -> None:
    assert f"'{key}'" in invalid(body(**{key: value}))


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens"])
def test_token_limits(key: str) -> None:
    assert chat_request_from_openai(body(**{key: 0})).options == {"num_predict": 0}
    for bad in (-1, 1.5, True, "10"):
        assert f"'{key}'" in invalid(body(**{key: bad}))


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert chat_request_from_openai(body(max_tokens=10, max_completion_tokens=20)).options["num_predict"] == 20


def test_seed_and_n() -> None:
    assert "'seed'" in invalid(body(seed="1"))
    assert "'seed'" in invalid(body(seed=1.0))
    assert chat_request_from_openai(body(n=1)).options == {}
    assert "'n'" in invalid(body(n=2))
    assert "'n'" in invalid(body(n="1"))


def test_stop_string_or_list() -> None:
    assert chat_request_from_openai(body(stop="END")).options == {"stop": ["END"]}
    assert chat_request_from_openai(body(stop=["a", "b"])).options == {"stop": ["a", "b"]}
    assert "'stop'" in invalid(body(stop=["a", 1]))
    assert "'stop'" in invalid(body(stop=5))


def test_stream_options_include_usage() -> None:
    assert chat_request_from_openai(body(stream=True, stream_options={"include_usage": True})).include_usage is True
    assert chat_request_from_openai(body(stream=True, stream_options={})).include_usage is False
    assert chat_request_from_openai(body(stream=True)).include_usage is False
    assert "'stream_options'" in invalid(body(stream_options=True))
    assert "'stream_options.include_usage'" in invalid(body(stream_options={"include_usage": "yes"}))


def test_tools_pass_through_untouched() -> None:
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}]
    assert chat_request_from_openai(body(tools=tools)).tools == tools
    assert chat_request_from_openai(body(tools=[])).tools is None
    assert "'tools'" in invalid(body(tools={"name": "f"}))
    assert "'tools[1]'" in invalid(body(tools=[tools[0], "f"]))


def test_response_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    as_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    assert chat_request_from_openai(body(response_format={"type": "json_object"})).format == "json"
    assert chat_request_from_openai(body(response_format=as_schema)).format == schema
    assert chat_request_from_openai(body(response_format={"type": "text"})).format is None
    assert "response_format.type" in invalid(body(response_format={"type": "xml"}))
    assert "response_format.json_schema" in invalid(body(response_format={"type": "json_schema", "json_schema": 1}))
    assert "'response_format'" in invalid(body(response_format="json"))


@pytest.mark.parametrize(
    "effort, think", [("low", "low"), ("medium", "medium"), ("high", "high"), ("none", False), ("minimal", "low")]
)
def test_reasoning_effort_becomes_think(effort: str, think: object) -> None:
    assert chat_request_from_openai(body(reasoning_effort=effort)).think == think
    assert chat_request_from_openai(body(reasoning={"effort": effort})).think == think


def test_invalid_reasoning_effort() -> None:
    assert "'reasoning_effort'" in invalid(body(reasoning_effort="extreme"))
    assert "'reasoning.effort'" in invalid(body(reasoning={"effort": 3}))
    assert chat_request_from_openai(body()).think is None


def test_request_validates_against_the_openai_param_types() -> None:
    # The bodies used above are what the real client would send: keep them honest.
    sent = body(temperature=0.2, stop=["x"], response_format={"type": "json_object"}, reasoning_effort="low")
    materialize(CHAT_NON_STREAMING.validate_python(sent))
    assert chat_request_from_openai(sent).think == "low"


# ---------------------------------------------------------------------------------------------
# completion_request_from_openai
# ---------------------------------------------------------------------------------------------


def test_completion_request() -> None:
    req = completion_request_from_openai(
        {
            "model": "m",
            "prompt": "def f(",
            "suffix": "\n",
            "max_tokens": 16,
            "stop": "\n\n",
            "echo": False,
            "best_of": 1,
        }
    )
    assert req.kind == "completion" and req.prompt == "def f(" and req.suffix == "\n"
    assert req.stream is False and req.messages == []
    assert req.options == {"num_predict": 16, "stop": ["\n\n"]}
    assert req.user_texts() == ["def f("]


def test_completion_prompt_in_a_one_element_list_and_usage() -> None:
    req = completion_request_from_openai(
        {"model": "m", "prompt": ["hi"], "stream": True, "stream_options": {"include_usage": True}}
    )
    assert (req.prompt, req.stream, req.include_usage) == ("hi", True, True)


@pytest.mark.parametrize("prompt", [["a", "b"], [1, 2, 3], [[1, 2]], [], 5, None])
def test_completion_prompt_must_be_one_string(prompt: object) -> None:
    assert "'prompt'" in invalid({"model": "m", "prompt": prompt}, completion_request_from_openai)


def test_completion_rejects_bad_fields() -> None:
    assert "JSON object" in invalid([], completion_request_from_openai)
    assert "'suffix'" in invalid({"prompt": "x", "suffix": 1}, completion_request_from_openai)
    assert "'temperature'" in invalid({"prompt": "x", "temperature": False}, completion_request_from_openai)
    assert "'stream'" in invalid({"prompt": "x", "stream": "no"}, completion_request_from_openai)


def test_completion_body_matches_openai_param_types() -> None:
    sent = {"model": "m", "prompt": "x", "suffix": "y", "max_tokens": 3, "stream": False}
    TypeAdapter(text_params.CompletionCreateParamsNonStreaming).validate_python(sent)
    assert completion_request_from_openai(sent).suffix == "y"


# ---------------------------------------------------------------------------------------------
# Non-streamed answers
# ---------------------------------------------------------------------------------------------


def test_chat_completion_text_answer() -> None:
    events = [TextDelta("Hel"), TextDelta("lo"), Done("stop", Usage(prompt_tokens=12, completion_tokens=3))]
    out = openai_completion_from_events(events, **IDS)
    parsed = ChatCompletion.model_validate(out)
    assert parsed.id == "chatcmpl-test" and parsed.created == 1767225600 and parsed.model == "expert-code:latest"
    assert parsed.choices[0].message.content == "Hello"
    assert parsed.choices[0].finish_reason == "stop"
    assert out["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    assert "tool_calls" not in out["choices"][0]["message"]


def test_chat_completion_length_and_reasoning() -> None:
    out = openai_completion_from_events([ThinkingDelta("hmm"), TextDelta("a"), Done("length")], **IDS)
    ChatCompletion.model_validate(out)
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["choices"][0]["message"]["reasoning_content"] == "hmm"


def test_chat_completion_tool_calls() -> None:
    events = [
        ToolCallDelta(ToolCall(name="weather", arguments={"city": "Zürich"}, id="call_keep")),
        ToolCallDelta(ToolCall(name="clock", arguments={})),
        Done("stop"),
    ]
    out = openai_completion_from_events(events, **IDS)
    parsed = ChatCompletion.model_validate(out)
    choice = parsed.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    first, second = choice.message.tool_calls or []
    assert first.id == "call_keep" and first.type == "function"
    assert json.loads(first.function.arguments) == {"city": "Zürich"}
    assert second.id.startswith("call_") and len(second.id) > len("call_")
    assert second.function.arguments == "{}"


def test_chat_completion_never_has_a_null_finish_reason() -> None:
    # A backend that forgot its Done still gives a valid answer.
    out = openai_completion_from_events([TextDelta("x")], **IDS)
    assert ChatCompletion.model_validate(out).choices[0].finish_reason == "stop"
    for reason in ("load", "unload", "tool_calls"):
        out = openai_completion_from_events([Done(reason)], **IDS)  # type: ignore[arg-type]
        assert out["choices"][0]["finish_reason"] == "stop"


def test_text_completion_answer() -> None:
    events = [TextDelta("return "), TextDelta("1"), Done("length", Usage(prompt_tokens=4, completion_tokens=2))]
    out = openai_text_completion_from_events(events, model="m", completion_id="cmpl-1", created=5)
    parsed = Completion.model_validate(out)
    assert parsed.object == "text_completion"
    assert parsed.choices[0].text == "return 1" and parsed.choices[0].finish_reason == "length"
    assert parsed.usage is not None and parsed.usage.total_tokens == 6


# ---------------------------------------------------------------------------------------------
# Streamed chat answers
# ---------------------------------------------------------------------------------------------


def test_sse_shape_matches_the_golden_stream() -> None:
    events = [TextDelta("Hi"), Done("stop", Usage(prompt_tokens=12, completion_tokens=3))]
    text = list(openai_sse_from_events(events, **IDS, include_usage=True))
    payloads = sse_payloads(text)
    assert payloads[-1] == "[DONE]"
    first, content, finish, usage = payloads[:-1]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["choices"][0]["finish_reason"] is None
    assert content["choices"][0]["delta"] == {"content": "Hi"}
    assert finish["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 12,
        "completion_tokens": 3,
        "total_tokens": 15,
    }
    for chunk in payloads[:-1]:
        ChatCompletionChunk.model_validate(chunk)
        assert (chunk["id"], chunk["created"], chunk["model"]) == ("chatcmpl-test", 1767225600, "expert-code:latest")
        assert chunk["object"] == "chat.completion.chunk"


def test_sse_is_compact_and_keeps_unicode() -> None:
    text = list(openai_sse_from_events([TextDelta("héllo ✓"), Done()], **IDS, include_usage=False))
    assert "héllo ✓" in text[1]
    assert ", " not in text[0] and '": ' not in text[0]


def test_sse_without_usage_has_no_usage_chunk() -> None:
    payloads = sse_payloads(list(openai_sse_from_events([TextDelta("a"), Done()], **IDS, include_usage=False)))
    assert payloads[-1] == "[DONE]"
    assert all(p["choices"] for p in payloads[:-1])
    assert all("usage" not in p for p in payloads[:-1])


def test_sse_role_chunk_comes_before_the_first_event_is_pulled() -> None:
    pulled = []

    def slow() -> Iterator[ChatEvent]:
        pulled.append(True)
        yield Done()

    stream = openai_sse_from_events(slow(), **IDS, include_usage=False)
    first = next(stream)
    assert pulled == [] and '"role":"assistant"' in first


def test_sse_tool_calls_and_reasoning() -> None:
    events = [
        ThinkingDelta("let me check"),
        TextDelta(""),
        ToolCallDelta(ToolCall(name="weather", arguments={"city": "Tokyo"}, id="call_1", index=0)),
        ToolCallDelta(ToolCall(name="clock", arguments={}, index=0)),
        Done("stop"),
    ]
    payloads = sse_payloads(list(openai_sse_from_events(events, **IDS, include_usage=False)))
    for chunk in payloads[:-1]:
        ChatCompletionChunk.model_validate(chunk)
    deltas = [p["choices"][0]["delta"] for p in payloads[:-1]]
    assert deltas[1] == {"reasoning_content": "let me check"}
    assert deltas[2] == {
        "tool_calls": [
            {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city":"Tokyo"}'},
            }
        ]
    }
    second = deltas[3]["tool_calls"][0]
    # Each call gets its own index in the stream even if the backend left them all at 0.
    assert second["index"] == 1 and second["id"].startswith("call_")
    assert payloads[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert len(payloads) == 6  # role, reasoning, 2 calls, finish, [DONE]; the empty text is skipped


def test_sse_length_finish_and_events_after_done_are_ignored() -> None:
    events = [TextDelta("a"), Done("length"), TextDelta("too-late")]
    payloads = sse_payloads(list(openai_sse_from_events(events, **IDS, include_usage=False)))
    assert payloads[-2]["choices"][0]["finish_reason"] == "length"
    assert "too-late" not in json.dumps(payloads)


def test_sse_mid_stream_failure_becomes_one_generic_error_event() -> None:
    def failing() -> Iterator[ChatEvent]:
        yield TextDelta("partial")
        raise ExpertTimeout("read timeout from http://10.0.0.5:11434 /home/secret")

    text = list(openai_sse_from_events(failing(), **IDS, include_usage=True))
    payloads = sse_payloads(text)
    assert "[DONE]" not in payloads
    assert payloads[1]["choices"][0]["delta"] == {"content": "partial"}
    assert payloads[-1] == {
        "error": {"message": STREAM_ERROR_MESSAGE, "type": "api_error", "param": None, "code": None}
    }
    ErrorObject.model_validate(payloads[-1]["error"])
    assert "10.0.0.5" not in "".join(text) and "secret" not in "".join(text)


def test_sse_failure_of_any_exception_type_is_caught() -> None:
    def failing() -> Iterator[ChatEvent]:
        raise KeyError("internal")
        yield  # pragma: no cover

    payloads = sse_payloads(list(openai_sse_from_events(failing(), **IDS, include_usage=False)))
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    assert payloads[1]["error"]["message"] == STREAM_ERROR_MESSAGE
    assert len(payloads) == 2


def test_sse_client_facing_error_keeps_its_message() -> None:
    def refused() -> Iterator[ChatEvent]:
        raise ServiceUnavailable("No expert is available right now.")
        yield  # pragma: no cover

    payloads = sse_payloads(list(openai_sse_from_events(refused(), **IDS, include_usage=False)))
    assert payloads[-1]["error"]["message"] == "No expert is available right now."


def test_sse_closing_the_stream_closes_the_source() -> None:
    closed = []

    def source() -> Iterator[ChatEvent]:
        try:
            yield TextDelta("a")
            yield TextDelta("b")
        finally:
            closed.append(True)

    stream = openai_sse_from_events(source(), **IDS, include_usage=False)
    next(stream), next(stream)
    stream.close()
    assert closed == [True]


def test_real_openai_client_reads_our_stream_and_raises_on_the_error_event() -> None:
    def failing() -> Iterator[ChatEvent]:
        yield TextDelta("Hi")
        raise ExpertTimeout("boom")

    client = openai.OpenAI(api_key="x", base_url="http://127.0.0.1:9/v1")
    ok = "".join(openai_sse_from_events([TextDelta("Hi"), Done()], **IDS, include_usage=True)).encode()
    bad = "".join(openai_sse_from_events(failing(), **IDS, include_usage=False)).encode()
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")

    def stream_of(content: bytes) -> openai.Stream[ChatCompletionChunk]:
        response = httpx.Response(200, content=content, headers={"content-type": "text/event-stream"}, request=request)
        return openai.Stream(cast_to=ChatCompletionChunk, response=response, client=client)

    chunks = list(stream_of(ok))
    assert [c.choices[0].delta.content for c in chunks if c.choices] == ["", "Hi", None]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    with pytest.raises(openai.APIError, match=STREAM_ERROR_MESSAGE):
        list(stream_of(bad))


# ---------------------------------------------------------------------------------------------
# Streamed text completions
# ---------------------------------------------------------------------------------------------


def test_text_sse_stream() -> None:
    events = [TextDelta("foo"), ThinkingDelta("ignored"), TextDelta("bar"), Done("stop", Usage(1, 2))]
    text = list(openai_text_sse_from_events(events, model="m", completion_id="cmpl-9", created=7, include_usage=True))
    payloads = sse_payloads(text)
    assert payloads[-1] == "[DONE]"
    *pieces, final, usage = payloads[:-1]
    assert [p["choices"][0]["text"] for p in pieces] == ["foo", "bar"]
    for p in pieces:
        assert p["object"] == "text_completion"
        assert p["choices"][0] == {"text": p["choices"][0]["text"], "index": 0, "finish_reason": None, "logprobs": None}
    assert Completion.model_validate(final).choices[0].finish_reason == "stop"
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 3
    Completion.model_validate(usage)
    assert {(p["id"], p["created"]) for p in payloads[:-1]} == {("cmpl-9", 7)}


def test_text_sse_failure() -> None:
    def failing() -> Iterator[ChatEvent]:
        yield TextDelta("x")
        raise RuntimeError("disk /var/secret")

    text = list(openai_text_sse_from_events(failing(), model="m", completion_id="c", created=1, include_usage=True))
    payloads = sse_payloads(text)
    assert payloads[-1]["error"]["type"] == "api_error" and "secret" not in "".join(text)
    assert "[DONE]" not in payloads


# ---------------------------------------------------------------------------------------------
# Errors, models, ids
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "err, status, kind, code",
    [
        (InvalidRequest("bad"), 400, "invalid_request_error", None),
        (Unauthorized("no key"), 401, "authentication_error", "invalid_api_key"),
        (UnknownModel("model 'x' not found"), 404, "not_found_error", "model_not_found"),
        (MethodNotAllowed("no"), 405, "invalid_request_error", None),
        (BodyTooLarge("big"), 413, "invalid_request_error", None),
        (RateLimited("slow down", retry_after=5), 429, "rate_limit_error", "rate_limit_exceeded"),
        (ServiceUnavailable("busy"), 503, "api_error", None),
    ],
)
def test_error_body(err: Any, status: int, kind: str, code: str | None) -> None:
    out, got_status = openai_error_body(err)
    assert got_status == status
    assert out == {"error": {"message": err.message, "type": kind, "param": None, "code": code}}
    ErrorObject.model_validate(out["error"])


def card(name: str, modified_at: float = 1735689600.7) -> ModelCard:
    return ModelCard(
        name=name,
        family="lemoe",
        format="remote",
        parameter_size="unknown",
        quantization_level="unknown",
        size=1,
        digest="0" * 64,
        modified_at=modified_at,
        context_length=8192,
    )


def test_models() -> None:
    one = openai_model(card("programador:latest"))
    assert one == {"id": "programador:latest", "object": "model", "created": 1735689600, "owned_by": "library"}
    Model.model_validate(one)
    listing = openai_model_list([card("a:latest"), card("b:latest")])
    assert listing["object"] == "list" and [m["id"] for m in listing["data"]] == ["a:latest", "b:latest"]
    assert openai_model_list([]) == {"object": "list", "data": []}


def test_new_completion_id() -> None:
    ids = {new_completion_id() for _ in range(50)}
    assert len(ids) == 50 and all(i.startswith("chatcmpl-") for i in ids)
    assert new_completion_id("cmpl").startswith("cmpl-")


# ---------------------------------------------------------------------------------------------
# Client side: bodies for an upstream
# ---------------------------------------------------------------------------------------------


def conversation() -> ChatRequest:
    return ChatRequest(
        model="lemoe",
        messages=[
            Message(role="system", content="be brief"),
            Message(role="user", content="weather and time?", images=[PNG_B64, JPEG_B64]),
            Message(
                role="assistant",
                content="",
                thinking="need tools",
                tool_calls=[
                    ToolCall(name="weather", arguments={"city": "Tokyo"}, id="call_w"),
                    ToolCall(name="clock", arguments={}, index=1),
                ],
            ),
            # An Ollama client answers by tool name only.
            Message(role="tool", content="12:00", tool_name="clock"),
            Message(role="tool", content="sunny", tool_call_id="call_w", tool_name="weather"),
        ],
        options={
            "num_predict": 100,
            "stop": ["END"],
            "temperature": 0.3,
            "top_p": 0.9,
            "seed": 7,
            "presence_penalty": 0.1,
            "frequency_penalty": 0.2,
            "top_k": 40,
            "num_ctx": 4096,
            "repeat_penalty": 1.1,
        },
        tools=[{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
        format={"type": "object"},
        think="high",
    )


def test_chat_body_for_upstream() -> None:
    out = openai_chat_body_from_request(conversation(), "qwen2.5-coder")
    assert out["model"] == "qwen2.5-coder"
    assert out["stream"] is True and out["stream_options"] == {"include_usage": True}
    system, user, assistant, clock, weather = out["messages"]
    assert system == {"role": "system", "content": "be brief"}
    assert user["content"] == [
        {"type": "text", "text": "weather and time?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
        {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{JPEG_B64}"}},
    ]
    assert assistant == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_w", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Tokyo"}'}},
            {"id": "call_2_1", "type": "function", "function": {"name": "clock", "arguments": "{}"}},
        ],
    }
    assert clock == {"role": "tool", "tool_call_id": "call_2_1", "content": "12:00"}
    assert weather == {"role": "tool", "tool_call_id": "call_w", "content": "sunny"}
    assert {
        k: out[k]
        for k in ("max_tokens", "stop", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")
    } == {
        "max_tokens": 100,
        "stop": ["END"],
        "temperature": 0.3,
        "top_p": 0.9,
        "seed": 7,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
    }
    assert not {"top_k", "num_ctx", "repeat_penalty", "num_predict", "options"} & out.keys()
    assert out["tools"] == conversation().tools
    assert out["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "response", "schema": {"type": "object"}},
    }
    assert out["reasoning_effort"] == "high"
    materialize(CHAT_STREAMING.validate_python(out))


def test_chat_body_is_deterministic() -> None:
    assert openai_chat_body_from_request(conversation(), "m") == openai_chat_body_from_request(conversation(), "m")


def test_chat_body_options_edge_cases() -> None:
    req = ChatRequest(
        model=None, messages=[Message(role="user", content="x")], options={"num_predict": -1}, format="json"
    )
    out = openai_chat_body_from_request(req, "m")
    assert "max_tokens" not in out and "stop" not in out and "tools" not in out and "reasoning_effort" not in out
    assert out["response_format"] == {"type": "json_object"}
    assert out["messages"] == [{"role": "user", "content": "x"}]
    for think, effort in ((True, None), (False, None), ("max", "high"), ("low", "low")):
        req.think = think
        assert openai_chat_body_from_request(req, "m").get("reasoning_effort") == effort


def test_chat_body_parses_back_into_the_same_conversation() -> None:
    original = conversation()
    back = chat_request_from_openai(openai_chat_body_from_request(original, "m"))
    assert [m.content for m in back.messages] == [m.content for m in original.messages]
    assert back.messages[1].images == [PNG_B64, JPEG_B64]
    assert [(c.name, c.arguments) for c in back.messages[2].tool_calls] == [
        ("weather", {"city": "Tokyo"}),
        ("clock", {}),
    ]
    assert [m.tool_name for m in back.messages[3:]] == ["clock", "weather"]
    assert back.format == original.format and back.tools == original.tools and back.think == "high"
    assert back.options == {
        k: v for k, v in original.options.items() if k not in ("top_k", "num_ctx", "repeat_penalty")
    }


def test_completion_body_for_upstream() -> None:
    req = ChatRequest(
        model="m", messages=[], kind="completion", prompt="def f(", suffix="  return", options={"num_predict": 8}
    )
    out = openai_completion_body_from_request(req, "coder")
    assert out == {
        "model": "coder",
        "prompt": "def f(",
        "suffix": "  return",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 8,
    }
    TypeAdapter(text_params.CompletionCreateParamsStreaming).validate_python(out)
    no_suffix = openai_completion_body_from_request(
        ChatRequest(model="m", messages=[], kind="completion", prompt="p"), "c"
    )
    assert "suffix" not in no_suffix


# ---------------------------------------------------------------------------------------------
# Client side: parsing an upstream stream
# ---------------------------------------------------------------------------------------------


def upstream(*payloads: object, done: bool = True) -> list[bytes]:
    lines: list[bytes] = []
    for p in payloads:
        lines += [b"data: " + json.dumps(p).encode(), b""]
    if done:
        lines += [b"data: [DONE]", b""]
    return lines


def delta(fields: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "x",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": fields, "finish_reason": finish}],
    }


def test_parse_text_reasoning_finish_and_usage() -> None:
    lines = upstream(
        delta({"role": "assistant", "content": ""}),
        delta({"reasoning_content": "think"}),
        delta({"reasoning": "more"}),
        delta({"content": "Hel"}),
        delta({"content": "lo"}),
        delta({}, "stop"),
        {"id": "x", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}},
    )
    assert list(events_from_openai_sse(lines)) == [
        ThinkingDelta("think"),
        ThinkingDelta("more"),
        TextDelta("Hel"),
        TextDelta("lo"),
        Done("stop", Usage(prompt_tokens=9, completion_tokens=2)),
    ]


def test_parse_sse_framing_variants() -> None:
    lines: list[bytes | str] = [
        ": keep-alive",
        "event: message",
        'data:{"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}]}\r',
        "",
        "id: 5",
        'data: {"choices":[{"index":0,',
        'data: "delta":{"content":"b"},"finish_reason":"length"}]}',
        "",
        b"data: [DONE]",
        b"",
        b"data: {this is after DONE and never read",
    ]
    assert list(events_from_openai_sse(lines)) == [TextDelta("a"), TextDelta("b"), Done("length")]


def test_parse_survives_an_invalid_utf8_byte() -> None:
    lines = [b'data: {"choices":[{"index":0,"delta":{"content":"a\xff"},"finish_reason":"stop"}]}', b""]
    assert list(events_from_openai_sse(lines)) == [TextDelta("a\ufffd"), Done("stop")]


def test_parse_assembles_tool_call_fragments_by_index() -> None:
    lines = upstream(
        delta({"role": "assistant", "content": None}),
        delta(
            {
                "tool_calls": [
                    {"index": 0, "id": "call_a", "type": "function", "function": {"name": "weather", "arguments": ""}}
                ]
            }
        ),
        delta(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "call_b",
                        "type": "function",
                        "function": {"name": "clock", "arguments": '{"tz"'},
                    }
                ]
            }
        ),
        delta({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
        delta(
            {
                "tool_calls": [
                    {"index": 0, "function": {"arguments": '"Tokyo"}'}},
                    {"index": 1, "function": {"arguments": ':"UTC"}'}},
                ]
            }
        ),
        delta({}, "tool_calls"),
    )
    assert list(events_from_openai_sse(lines)) == [
        ToolCallDelta(ToolCall(name="weather", arguments={"city": "Tokyo"}, id="call_a", index=0)),
        ToolCallDelta(ToolCall(name="clock", arguments={"tz": "UTC"}, id="call_b", index=1)),
        Done("tool_calls"),
    ]


def test_parse_tool_calls_with_a_stop_finish_still_report_tool_calls() -> None:
    lines = upstream(
        delta({"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": ""}}]}, "stop")
    )
    assert list(events_from_openai_sse(lines)) == [
        ToolCallDelta(ToolCall(name="f", arguments={}, id="c", index=0)),
        Done("tool_calls"),
    ]


@pytest.mark.parametrize("finish, reason", [("content_filter", "stop"), ("length", "length"), ("weird", "stop")])
def test_parse_maps_finish_reasons(finish: str, reason: str) -> None:
    events = list(events_from_openai_sse(upstream(delta({"content": "x"}, finish))))
    assert events[-1] == Done(reason)  # type: ignore[arg-type]


def test_parse_text_completion_chunks() -> None:
    lines = upstream(
        {"object": "text_completion", "choices": [{"text": "foo", "index": 0, "finish_reason": None}]},
        {
            "object": "text_completion",
            "choices": [{"text": "", "index": 0, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1},
        },
    )
    assert list(events_from_openai_sse(lines)) == [TextDelta("foo"), Done("stop", Usage(3, 1))]


def test_parse_stream_without_done_marker_still_ends_with_done() -> None:
    events = list(events_from_openai_sse(upstream(delta({"content": "a"}, "stop"), done=False)))
    assert events == [TextDelta("a"), Done("stop")]


@pytest.mark.parametrize(
    "lines",
    [
        upstream(delta({"content": "a"}), {"error": {"message": "model crashed", "type": "server_error"}}),
        upstream({"error": "plain string error"}),
        [b"data: {not json", b""],
        [b"data: [1, 2]", b""],
        upstream(delta({"content": "a"})),  # no finish_reason at all
        upstream(delta({"content": "a"}), done=False),
        [],
        upstream(
            delta(
                {"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": "{bad"}}]}, "tool_calls"
            )
        ),
        upstream(
            delta(
                {"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": "[1]"}}]}, "tool_calls"
            )
        ),
        upstream(delta({"tool_calls": [{"index": 0, "id": "c", "function": {"arguments": "{}"}}]}, "tool_calls")),
    ],
)
def test_parse_broken_streams_raise(lines: list[bytes]) -> None:
    with pytest.raises(ExpertStreamBroken):
        list(events_from_openai_sse(lines))


def test_parse_yields_events_before_a_later_break() -> None:
    got: list[ChatEvent] = []
    with pytest.raises(ExpertStreamBroken):
        for event in events_from_openai_sse(upstream(delta({"content": "a"}), {"error": {"message": "x"}})):
            got.append(event)
    assert got == [TextDelta("a")]


# ---------------------------------------------------------------------------------------------
# Round trips: our SSE writer -> our SSE reader gives back the same events
# ---------------------------------------------------------------------------------------------


ROUND_TRIPS: list[list[ChatEvent]] = [
    [TextDelta("Hel"), TextDelta("lo ✓"), Done("stop", Usage(prompt_tokens=5, completion_tokens=2))],
    [ThinkingDelta("hmm"), TextDelta("4"), Done("length", Usage(1, 1))],
    [
        TextDelta("Calling."),
        ToolCallDelta(ToolCall(name="weather", arguments={"city": "Tokyo", "days": [1, 2]}, id="call_a", index=0)),
        ToolCallDelta(ToolCall(name="clock", arguments={}, id="call_b", index=1)),
        Done("tool_calls", Usage(10, 20)),
    ],
    [Done("stop")],
]


@pytest.mark.parametrize("events", ROUND_TRIPS)
@pytest.mark.parametrize("as_bytes", [True, False])
def test_round_trip_chat_stream(events: list[ChatEvent], as_bytes: bool) -> None:
    text = list(openai_sse_from_events(events, **IDS, include_usage=True))
    assert list(events_from_openai_sse(lines_of(text, as_bytes))) == events


def test_round_trip_text_stream() -> None:
    events: list[ChatEvent] = [TextDelta("def "), TextDelta("f():"), Done("length", Usage(3, 4))]
    text = list(openai_text_sse_from_events(events, model="m", completion_id="c", created=1, include_usage=True))
    assert list(events_from_openai_sse(lines_of(text))) == events


def test_round_trip_mid_stream_error_is_a_broken_stream_upstream() -> None:
    def failing() -> Iterator[ChatEvent]:
        yield TextDelta("a")
        raise ExpertTimeout("gone")

    text = list(openai_sse_from_events(failing(), **IDS, include_usage=True))
    with pytest.raises(ExpertStreamBroken):
        list(events_from_openai_sse(lines_of(text)))


def test_round_trip_request_body_to_events() -> None:
    # Upstream body built from a request; the fake upstream answers with our own SSE writer.
    req = chat_request_from_openai(body(stream=True, stream_options={"include_usage": True}, max_tokens=5))
    sent = openai_chat_body_from_request(req, "upstream-model")
    assert sent["max_tokens"] == 5 and sent["messages"] == [USER]
    answer: list[ChatEvent] = [TextDelta("hi"), Done("length", Usage(3, 5))]
    text = list(openai_sse_from_events(answer, model=sent["model"], completion_id="c", created=1, include_usage=True))
    assert list(events_from_openai_sse(lines_of(text))) == answer


def test_body_has_images_finds_image_url_parts() -> None:
    from modules.protocol.openai_protocol import body_has_images

    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}}
    assert body_has_images({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, part]}]})
    for body in ({"messages": [{"role": "user", "content": "image_url"}]}, {"messages": [{"content": [{"type": "text"}]}]},
                 {"messages": None}, None, {"messages": [[part]]}):
        assert not body_has_images(body)

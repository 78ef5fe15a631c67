"""The one OpenAI upstream codec: its strictness on stream chunks, and its message writer in
each backend's style (an OpenAI server, LiteLLM, llama-cpp's and ONNX's chat templates)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest

from modules.ai_engine import llama_messages_from_request
from modules.chat_types import (
    ChatEvent,
    ChatRequest,
    Done,
    Message,
    TextDelta,
    ThinkingDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from modules.errors import ExpertStreamBroken
from modules.litellm_backend import litellm_messages_from_request
from modules.onnx_runner import onnx_messages_from_request
from modules.protocol.openai_protocol import openai_chat_body_from_request
from modules.protocol.openai_upstream import (
    OpenAIStreamReader,
    events_from_openai_sse,
    openai_messages,
    openai_messages_from_request,
)

PNG_B64 = base64.b64encode(b"\x89PNG\r\n\x1a\n fake png bytes").decode()
JPEG_B64 = base64.b64encode(b"\xff\xd8\xff\xe0 fake jpeg bytes").decode()


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}],
            **extra}


def read_dicts(chunks: list[object]) -> list[ChatEvent]:
    """As llama-cpp and LiteLLM feed the reader: one dict a chunk."""
    reader = OpenAIStreamReader()
    events = [event for c in chunks for event in reader.feed(c)]
    return [*events, *reader.end()]


def read_sse(chunks: list[object]) -> list[ChatEvent]:
    """As an OpenAI-compatible server sends them: SSE lines."""
    lines = [line for c in chunks for line in (f"data: {json.dumps(c)}".encode(), b"")]
    return list(events_from_openai_sse([*lines, b"data: [DONE]", b""]))


# Every source goes through the same reader, so each case holds for both framings.
READERS: list[Callable[[list[object]], list[ChatEvent]]] = [read_dicts, read_sse]


def call_fragment(index: int, **fields: Any) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, **fields}]}


@pytest.mark.parametrize("read", READERS)
def test_tool_call_deltas_split_across_chunks_are_given_whole_at_the_finish(
    read: Callable[[list[object]], list[ChatEvent]],
) -> None:
    chunks: list[object] = [
        chunk({"role": "assistant", "content": None}),
        chunk(call_fragment(0, id="call_a", type="function", function={"name": "weather", "arguments": ""})),
        chunk(call_fragment(1, id="call_b", function={"name": "clock", "arguments": '{"tz"'})),
        # A repeated name (some llama-cpp handlers) and a blank id do not replace the first ones.
        chunk(call_fragment(0, id="", function={"name": "weather", "arguments": '{"city": '})),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Tokyo"}'}},
                              {"index": 1, "function": {"arguments": ':"UTC"}'}}]}),
        chunk({}, "tool_calls"),
    ]
    assert read(chunks) == [
        ToolCallDelta(ToolCall(name="weather", arguments={"city": "Tokyo"}, id="call_a", index=0)),
        ToolCallDelta(ToolCall(name="clock", arguments={"tz": "UTC"}, id="call_b", index=1)),
        Done("tool_calls"),
    ]


def test_calls_are_given_at_the_finish_chunk_not_before() -> None:
    reader = OpenAIStreamReader()
    assert reader.feed(chunk(call_fragment(0, id="c", function={"name": "f", "arguments": '{"a":'}))) == []
    assert reader.feed(chunk(call_fragment(0, function={"arguments": "1}"}))) == []
    # Arguments sent as an object (a few servers) are taken as they are.
    assert reader.feed(chunk(call_fragment(1, function={"name": "g", "arguments": {"b": 2}}), "stop")) == [
        ToolCallDelta(ToolCall("f", {"a": 1}, id="c", index=0)),
        ToolCallDelta(ToolCall("g", {"b": 2}, id=None, index=1)),
    ]
    # A stop finish after calls still says the answer called tools.
    assert reader.end() == [Done("tool_calls")]


@pytest.mark.parametrize("read", READERS)
def test_usage_in_the_last_chunk_reaches_done(read: Callable[[list[object]], list[ChatEvent]]) -> None:
    chunks: list[object] = [
        chunk({"reasoning_content": "hm"}),
        chunk({"content": "Hel"}),
        chunk({"content": "lo"}),
        chunk({}, "length"),
        # include_usage: a last chunk with no choices; an earlier `"usage": null` counts for nothing.
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}},
    ]
    chunks[1]["usage"] = None  # type: ignore[index]
    assert read(chunks) == [ThinkingDelta("hm"), TextDelta("Hel"), TextDelta("lo"), Done("length", Usage(9, 2))]


def test_bad_usage_numbers_count_as_zero() -> None:
    usage = {"prompt_tokens": -1, "completion_tokens": True}
    assert read_dicts([chunk({"content": "a"}, "stop", usage=usage)])[-1] == Done("stop", Usage(0, 0))


MALFORMED: list[tuple[str, list[object]]] = [
    ("not an object", [chunk({"content": "a"}), [1, 2]]),
    ("an error event", [chunk({"content": "a"}), {"error": {"message": "model crashed"}}]),
    ("an error string", [{"error": "overloaded"}]),
    ("a fragment that is not an object", [chunk({"tool_calls": ["f"]}, "tool_calls")]),
    ("a fragment index that is not an integer", [chunk(call_fragment("0", function={"name": "f"}), "tool_calls")]),  # type: ignore[arg-type]
    ("arguments that are not JSON", [chunk(call_fragment(0, function={"name": "f", "arguments": "{bad"}), "stop")]),
    ("arguments that are not an object", [chunk(call_fragment(0, function={"name": "f", "arguments": "[1]"}), "stop")]),
    ("a call without a name", [chunk(call_fragment(0, function={"arguments": "{}"}), "tool_calls")]),
    ("no finish reason", [chunk({"content": "a"})]),
    ("nothing at all", []),
]


@pytest.mark.parametrize("read", READERS)
@pytest.mark.parametrize("what, chunks", MALFORMED, ids=[what for what, _ in MALFORMED])
def test_a_malformed_stream_is_broken_whatever_the_source(
    read: Callable[[list[object]], list[ChatEvent]], what: str, chunks: list[object]
) -> None:
    with pytest.raises(ExpertStreamBroken):
        read(chunks)


def test_events_before_a_malformed_chunk_are_given_first() -> None:
    # So the runner can tell a break after the first token (the protocol's error end) from one
    # before it (the silent fallback).
    reader = OpenAIStreamReader()
    assert reader.feed(chunk({"content": "a"})) == [TextDelta("a")]
    with pytest.raises(ExpertStreamBroken):
        reader.feed({"error": "x"})


def test_sse_data_that_is_not_json_is_broken() -> None:
    with pytest.raises(ExpertStreamBroken):
        list(events_from_openai_sse([b"data: {not json", b""]))


@pytest.mark.parametrize("finish, reason", [("stop", "stop"), ("length", "length"), ("content_filter", "stop"),
                                            ("function_call", "tool_calls"), ("weird", "stop")])
def test_finish_reasons(finish: str, reason: str) -> None:
    assert read_dicts([chunk({"content": "x"}, finish)])[-1] == Done(reason)  # type: ignore[arg-type]


def test_text_completion_chunks_and_what_may_be_absent() -> None:
    chunks: list[object] = [
        {"object": "text_completion", "choices": [{"text": "foo", "index": 0, "finish_reason": None}]},
        {"choices": None},
        {"choices": ["not a choice"]},
        chunk(None),
        {"choices": [{"text": "", "finish_reason": "stop"}]},
    ]
    assert read_dicts(chunks) == [TextDelta("foo"), Done("stop")]


# ---------------------------------------------------------------------------------------------
# The one message writer, in every backend's style
# ---------------------------------------------------------------------------------------------

SERVER: dict[str, Any] = {}
LITELLM: dict[str, Any] = {"tool_names": True}
LLAMA: dict[str, Any] = {"string_content": True, "tool_names": True, "arguments": "spaced"}
ONNX: dict[str, Any] = {"string_content": True, "tool_names": True, "arguments": "object"}
STYLES = {"server": SERVER, "litellm": LITELLM, "llama": LLAMA, "onnx": ONNX}


def conversation() -> list[Message]:
    return [
        Message("system", "be brief"),
        Message("user", "weather and time?", images=[PNG_B64, JPEG_B64]),
        Message("assistant", "", thinking="need tools", tool_calls=[
            ToolCall("weather", {"city": "Zürich"}, id="call_w"),
            ToolCall("clock", {}, index=1),
        ]),
        # An Ollama client answers by tool name only; an OpenAI one by id.
        Message("tool", "12:00", tool_name="clock"),
        Message("tool", "sunny", tool_call_id="call_w", tool_name="weather"),
        Message("assistant", "Sunny, 12:00.", thinking="easy"),
    ]


def test_images_are_content_parts_for_servers_and_left_out_for_templates() -> None:
    parts = [
        {"type": "text", "text": "weather and time?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
        {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{JPEG_B64}"}},
    ]
    for style in (SERVER, LITELLM):
        assert openai_messages(conversation(), **style)[1] == {"role": "user", "content": parts}
    for style in (LLAMA, ONNX):
        assert openai_messages(conversation(), **style)[1] == {"role": "user", "content": "weather and time?"}
    # No empty text part beside an image alone.
    alone = openai_messages([Message("user", "", images=[PNG_B64])])[0]
    assert alone["content"] == parts[1:2]


@pytest.mark.parametrize("name", STYLES)
def test_tool_calls_get_ids_and_arguments_in_the_style_asked(name: str) -> None:
    assistant = openai_messages(conversation(), **STYLES[name])[2]
    arguments = {
        "server": ['{"city":"Zürich"}', "{}"],
        "litellm": ['{"city":"Zürich"}', "{}"],
        "llama": ['{"city": "Z\\u00fcrich"}', "{}"],
        "onnx": [{"city": "Zürich"}, {}],
    }[name]
    assert assistant == {
        "role": "assistant",
        # Servers read a turn of calls alone as null content; templates index a string.
        "content": "" if name in ("llama", "onnx") else None,
        "tool_calls": [
            {"id": "call_w", "type": "function", "function": {"name": "weather", "arguments": arguments[0]}},
            {"id": "call_2_1", "type": "function", "function": {"name": "clock", "arguments": arguments[1]}},
        ],
    }


@pytest.mark.parametrize("name", STYLES)
def test_tool_results_answer_their_call_by_id(name: str) -> None:
    clock, weather = openai_messages(conversation(), **STYLES[name])[3:5]
    named = name != "server"
    # The result sent by name only gets the id made up for its call.
    assert clock == {"role": "tool", "tool_call_id": "call_2_1", "content": "12:00", **({"name": "clock"} if named else {})}
    assert weather == {"role": "tool", "tool_call_id": "call_w", "content": "sunny",
                       **({"name": "weather"} if named else {})}
    # A result that answers no call keeps its own id, or gets one.
    lone = openai_messages([Message("tool", "x", tool_call_id="call_9")], **STYLES[name])[0]
    assert lone["tool_call_id"] == "call_9"
    assert openai_messages([Message("tool", "x")], **STYLES[name])[0]["tool_call_id"] == "call_0_result"


@pytest.mark.parametrize("name", STYLES)
def test_thinking_of_earlier_turns_is_not_sent_back(name: str) -> None:
    messages = openai_messages(conversation(), **STYLES[name])
    assert messages[5] == {"role": "assistant", "content": "Sunny, 12:00."}
    assert not any("thinking" in m or "reasoning_content" in m or "reasoning" in m for m in messages)


def test_the_writer_is_deterministic_and_pure() -> None:
    original = conversation()
    assert openai_messages(original) == openai_messages(conversation())
    assert original == conversation()


def test_a_completion_becomes_one_user_turn() -> None:
    request = ChatRequest(model=None, messages=[], kind="completion", prompt="2+2=")
    for style in STYLES.values():
        assert openai_messages_from_request(request, **style) == [{"role": "user", "content": "2+2="}]


def test_every_backend_writes_through_the_one_writer() -> None:
    request = ChatRequest(model=None, messages=conversation())
    assert openai_chat_body_from_request(request, "m")["messages"] == openai_messages(conversation(), **SERVER)
    assert litellm_messages_from_request(request) == openai_messages(conversation(), **LITELLM)
    assert llama_messages_from_request(request) == openai_messages(conversation(), **LLAMA)
    assert onnx_messages_from_request(request) == openai_messages(conversation(), **ONNX)

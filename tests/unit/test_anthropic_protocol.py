"""Anthropic Messages codec, with plain values and checked against the real `anthropic` types."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from anthropic.types import Message as AnthropicMessage
from anthropic.types import RawMessageStreamEvent
from pydantic import TypeAdapter

from modules.protocol.anthropic_protocol import (
    STREAM_ERROR_MESSAGE,
    anthropic_error_body,
    anthropic_message_from_events,
    anthropic_sse_from_events,
    body_has_images,
    chat_request_from_anthropic,
    is_anthropic_path,
)
from modules.chat_types import ChatEvent, Done, TextDelta, ThinkingDelta, ToolCall, ToolCallDelta, Usage
from modules.errors import ExpertStreamBroken, InvalidRequest, ServiceUnavailable, UnknownModel

PNG_B64 = base64.b64encode(b"\x89PNG\r\n\x1a\n fake png bytes").decode()
STREAM_EVENT = TypeAdapter(RawMessageStreamEvent)


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "claude-x", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}], **fields}


def sse(lines: Iterator[str]) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) pairs, each data checked against the SDK's stream event union."""
    out = []
    for block in "".join(lines).split("\n\n"):
        if not block:
            continue
        head, data = block.split("\n")
        assert head.startswith("event: ") and data.startswith("data: ")
        payload = json.loads(data[6:])
        assert payload["type"] == head[7:]
        if payload["type"] not in ("ping", "error"):
            STREAM_EVENT.validate_python(payload)
        out.append((head[7:], payload))
    return out


# --- requests in --------------------------------------------------------------------------------


def test_a_plain_request_becomes_a_chat_request() -> None:
    req = chat_request_from_anthropic(body(system="Be terse.", stream=True, temperature=0.5, top_p=0.9, top_k=40,
                                           stop_sequences=["END"]))
    assert req.model == "claude-x" and req.stream is True
    assert [(m.role, m.content) for m in req.messages] == [("system", "Be terse."), ("user", "hi")]
    assert req.options == {"num_predict": 100, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "stop": ["END"]}
    assert req.tools is None and req.think is None


def test_system_blocks_are_joined() -> None:
    req = chat_request_from_anthropic(body(system=[{"type": "text", "text": "One."}, {"type": "text", "text": "Two."}]))
    assert req.messages[0].content == "One.\nTwo."


def test_content_blocks_text_image_tool_use_and_result() -> None:
    req = chat_request_from_anthropic(body(messages=[
        {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                     {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                  "data": PNG_B64}}]},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "x"},
                                          {"type": "text", "text": "Let me look."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "look", "input": {"q": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": [{"type": "text", "text": "a cat"}]},
                                     {"type": "text", "text": "so?"}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "boom",
                                      "is_error": True}]},
    ]))
    user, assistant, result, follow_up, failed = req.messages
    assert (user.content, user.images) == ("what is this?", [PNG_B64])
    assert (assistant.content, assistant.thinking) == ("Let me look.", "hmm")
    assert assistant.tool_calls == [ToolCall("look", {"q": 1}, "toolu_1", 0)]
    # Tool results come before the text of the same turn, named after the call they answer.
    assert (result.role, result.content, result.tool_call_id, result.tool_name) == ("tool", "a cat", "toolu_1", "look")
    assert (follow_up.role, follow_up.content) == ("user", "so?")
    assert (failed.role, failed.content) == ("tool", "Error: boom")


def test_tools_become_function_tools_and_none_choice_drops_them() -> None:
    tool = {"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}}
    req = chat_request_from_anthropic(body(tools=[tool], tool_choice={"type": "auto"}))
    assert req.tools == [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"},
                                                            "description": "Weather"}}]
    assert chat_request_from_anthropic(body(tools=[tool], tool_choice={"type": "none"})).tools is None


@pytest.mark.parametrize(("fields", "think"), [
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, True),
    ({"thinking": {"type": "disabled"}}, False),
    ({"thinking": {"type": "adaptive"}}, True),
    ({"output_config": {"effort": "xhigh"}}, "high"),
    ({"output_config": {"effort": "low"}, "thinking": {"type": "disabled"}}, False),
])
def test_thinking_and_effort(fields: dict[str, Any], think: object) -> None:
    assert chat_request_from_anthropic(body(**fields)).think == think


def test_output_config_format_becomes_the_schema() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    req = chat_request_from_anthropic(body(output_config={"format": {"type": "json_schema", "schema": schema}}))
    assert req.format == schema


def test_count_tokens_bodies_need_no_max_tokens() -> None:
    fields = body()
    del fields["max_tokens"]
    assert chat_request_from_anthropic(fields, require_max_tokens=False).options == {}
    with pytest.raises(InvalidRequest, match="max_tokens: Field required"):
        chat_request_from_anthropic(fields)


@pytest.mark.parametrize(("fields", "needle"), [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": 5}]}, "content"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "text"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x"}}]}]},
     "base64"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "data": "%%"}}]}]},
     "base64"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": "x", "input": {}}]}]}, "id"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "x", "input": []}]}]},
     "input"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}, "tool_use_id"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "100"}, "max_tokens"),
    ({"temperature": 1.5}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"stop_sequences": "END"}, "stop_sequences"),
    ({"system": 3}, "system"),
    ({"tools": [{"description": "no name"}]}, "tools.0.name"),
    ({"tool_choice": {"type": "sometimes"}}, "tool_choice"),
    ({"thinking": {"type": "enabled"}}, "budget_tokens"),
    ({"output_config": {"effort": "extreme"}}, "effort"),
    ({"model": 7}, "model"),
    ({"stream": "yes"}, "stream"),
])
def test_bad_requests_name_the_field(fields: dict[str, Any], needle: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        chat_request_from_anthropic(body(**fields))
    assert needle in info.value.message


def test_a_body_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        chat_request_from_anthropic([1, 2])


def test_images_are_found_in_messages_and_tool_results() -> None:
    image = {"type": "image", "source": {"type": "base64", "data": PNG_B64}}
    assert body_has_images(body(messages=[{"role": "user", "content": [image]}]))
    assert body_has_images(body(messages=[{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": [image]}]}]))
    assert not body_has_images(body())
    assert not body_has_images("nonsense")


# --- answers out --------------------------------------------------------------------------------

USAGE = Usage(prompt_tokens=7, completion_tokens=3)


def test_a_whole_message_validates_as_the_sdk_type() -> None:
    events: list[ChatEvent] = [ThinkingDelta("hm"), TextDelta("Hel"), TextDelta("lo"), Done("stop", USAGE)]
    message = anthropic_message_from_events(events, model="m", message_id="msg_1")
    parsed = AnthropicMessage.model_validate(message)
    assert [b.type for b in parsed.content] == ["thinking", "text"]
    assert parsed.content[1].text == "Hello" and parsed.stop_reason == "end_turn"
    assert (parsed.usage.input_tokens, parsed.usage.output_tokens) == (7, 3)


def test_a_tool_call_answer_and_the_stop_reasons() -> None:
    call = ToolCall("get_weather", {"city": "Oslo"}, None, 0)
    message = anthropic_message_from_events([ToolCallDelta(call), Done("stop", USAGE)], model="m", message_id="msg_1")
    block = AnthropicMessage.model_validate(message).content[0]
    assert block.type == "tool_use" and block.input == {"city": "Oslo"} and block.id.startswith("toolu_")
    assert message["stop_reason"] == "tool_use"
    assert anthropic_message_from_events([Done("length")], model="m", message_id="x")["stop_reason"] == "max_tokens"
    # Nothing at all is still one empty text block.
    assert anthropic_message_from_events([Done()], model="m", message_id="x")["content"] == [{"type": "text", "text": ""}]


def test_the_stream_opens_and_closes_one_block_per_kind() -> None:
    events: list[ChatEvent] = [ThinkingDelta("a"), ThinkingDelta("b"), TextDelta("Hi"), TextDelta("!"),
                               ToolCallDelta(ToolCall("f", {"x": 1}, "toolu_9", 0)), Done("stop", USAGE)]
    out = sse(anthropic_sse_from_events(events, model="m", message_id="msg_1"))
    assert [name for name, _ in out] == [
        "message_start", "ping",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop"]
    starts = [d for name, d in out if name == "content_block_start"]
    assert [(d["index"], d["content_block"]["type"]) for d in starts] == [(0, "thinking"), (1, "text"), (2, "tool_use")]
    assert out[11][1]["delta"] == {"type": "input_json_delta", "partial_json": '{"x":1}'}
    assert out[-2][1]["delta"]["stop_reason"] == "tool_use" and out[-2][1]["usage"]["output_tokens"] == 3


def test_a_failure_mid_stream_is_one_error_event_without_internals() -> None:
    def failing() -> Iterator[ChatEvent]:
        yield TextDelta("Hi")
        raise ExpertStreamBroken("connection reset by /srv/secret/path")

    out = sse(anthropic_sse_from_events(failing(), model="m", message_id="msg_1"))
    assert out[-1] == ("error", {"type": "error", "error": {"type": "api_error", "message": STREAM_ERROR_MESSAGE}})
    assert "message_stop" not in [name for name, _ in out]


def test_a_request_error_mid_stream_keeps_its_message_and_type() -> None:
    def failing() -> Iterator[ChatEvent]:
        raise ServiceUnavailable("no expert could answer")
        yield  # pragma: no cover

    out = sse(anthropic_sse_from_events(failing(), model="m", message_id="msg_1"))
    assert out[-1][1]["error"] == {"type": "overloaded_error", "message": "no expert could answer"}


@pytest.mark.parametrize(("err", "kind"), [
    (InvalidRequest("bad"), "invalid_request_error"),
    (UnknownModel("nope"), "not_found_error"),
    (ServiceUnavailable("down"), "overloaded_error"),
])
def test_error_bodies(err: Exception, kind: str) -> None:
    payload, status = anthropic_error_body(err)  # type: ignore[arg-type]
    assert payload == {"type": "error", "error": {"type": kind, "message": err.message}}  # type: ignore[attr-defined]
    assert status == err.status_code  # type: ignore[attr-defined]


def test_which_paths_are_anthropic() -> None:
    assert is_anthropic_path("/v1/messages") and is_anthropic_path("/v1/messages/count_tokens")
    assert not is_anthropic_path("/v1/messagesx") and not is_anthropic_path("/v1/chat/completions")

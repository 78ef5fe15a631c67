"""OpenAI Responses codec, with plain values and checked against the real `openai` types."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from modules.chat_types import ChatEvent, Done, TextDelta, ThinkingDelta, ToolCall, ToolCallDelta, Usage
from modules.errors import ExpertStreamBroken, InvalidRequest
from modules.protocol.responses_protocol import (
    STREAM_ERROR_MESSAGE,
    body_has_images,
    response_from_events,
    responses_request_from_openai,
    responses_sse_from_events,
)

PNG_B64 = base64.b64encode(b"\x89PNG\r\n\x1a\n fake png bytes").decode()
STREAM_EVENT = TypeAdapter(ResponseStreamEvent)
USAGE = Usage(prompt_tokens=7, completion_tokens=3)


def sse(lines: Iterator[str]) -> list[dict[str, Any]]:
    """Each event's data, checked against the SDK's stream event union and its event name."""
    out = []
    for block in "".join(lines).split("\n\n"):
        if not block:
            continue
        head, data = block.split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert head == f"event: {payload['type']}"
        STREAM_EVENT.validate_python(payload)
        out.append(payload)
    return out


def answer(events: list[ChatEvent], **echo: Any) -> dict[str, Any]:
    return response_from_events(events, model="m", response_id="resp_abc", created=1, echo=echo)


# --- requests in --------------------------------------------------------------------------------


def test_a_string_input_with_instructions_and_options() -> None:
    parsed = responses_request_from_openai({"model": "gpt-5", "input": "hi", "instructions": "Be terse.",
                                            "temperature": 0.3, "top_p": 0.8, "max_output_tokens": 50,
                                            "stream": True, "reasoning": {"effort": "medium"}})
    req = parsed.chat
    assert req.model == "gpt-5" and req.stream is True and req.think == "medium"
    assert [(m.role, m.content) for m in req.messages] == [("system", "Be terse."), ("user", "hi")]
    assert req.options == {"temperature": 0.3, "top_p": 0.8, "num_predict": 50}
    assert parsed.echo["instructions"] == "Be terse." and parsed.echo["max_output_tokens"] == 50
    assert parsed.echo["reasoning"] == {"effort": "medium", "summary": None}


def test_input_items_become_turns() -> None:
    req = responses_request_from_openai({"input": [
        {"role": "developer", "content": "rules"},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "look"},
            {"type": "input_image", "image_url": f"data:image/png;base64,{PNG_B64}", "detail": "auto"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "thinking..."}]},
        {"type": "function_call", "call_id": "call_1", "name": "look", "arguments": '{"q":1}'},
        {"type": "function_call", "call_id": "call_2", "name": "look", "arguments": '{"q":2}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "a cat"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "a dog"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Cat and dog."}]},
    ]}).chat
    system, user, calls, first, second, reply = req.messages
    assert (system.role, system.content) == ("system", "rules")
    assert (user.content, user.images) == ("look", [PNG_B64])
    assert calls.role == "assistant" and calls.thinking == "thinking..."
    assert calls.tool_calls == [ToolCall("look", {"q": 1}, "call_1", 0), ToolCall("look", {"q": 2}, "call_2", 1)]
    assert (first.role, first.content, first.tool_name) == ("tool", "a cat", "look")
    assert (second.content, second.tool_call_id) == ("a dog", "call_2")
    assert (reply.role, reply.content) == ("assistant", "Cat and dog.")


def test_function_tools_pass_and_hosted_tools_are_left_out() -> None:
    tools = [{"type": "function", "name": "f", "description": "d", "parameters": {"type": "object"}},
             {"type": "web_search"}]
    parsed = responses_request_from_openai({"input": "x", "tools": tools})
    assert parsed.chat.tools == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"},
                                                                   "description": "d"}}]
    assert [t["name"] for t in parsed.echo["tools"]] == ["f"]
    assert responses_request_from_openai({"input": "x", "tools": tools, "tool_choice": "none"}).chat.tools is None


@pytest.mark.parametrize(("text", "fmt"), [
    ({"format": {"type": "text"}}, None),
    ({"format": {"type": "json_object"}}, "json"),
    ({"format": {"type": "json_schema", "name": "r", "schema": {"type": "object"}}}, {"type": "object"}),
])
def test_text_format(text: dict[str, Any], fmt: object) -> None:
    assert responses_request_from_openai({"input": "x", "text": text}).chat.format == fmt


@pytest.mark.parametrize(("fields", "needle"), [
    ({}, "input"),
    ({"input": []}, "input"),
    ({"input": 5}, "input"),
    ({"input": [{"type": "mystery"}]}, "input[0].type"),
    ({"input": [{"role": "robot", "content": "x"}]}, "role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}]}, "image_url"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]}, "data:"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "file"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "call_id"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{oops"}]}, "arguments"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "call_id"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "x", "conversation": "conv_1"}, "conversation"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "instructions": 5}, "instructions"),
    ({"input": "x", "temperature": 3}, "temperature"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "reasoning": {"effort": "huge"}}, "reasoning.effort"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
    ({"input": "x", "model": 3}, "model"),
])
def test_bad_requests_name_the_field(fields: dict[str, Any], needle: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        responses_request_from_openai(fields)
    assert needle in info.value.message


def test_images_are_found_in_messages_and_function_outputs() -> None:
    image = {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}
    assert body_has_images({"input": [{"role": "user", "content": [image]}]})
    assert body_has_images({"input": [{"type": "function_call_output", "call_id": "c", "output": [image]}]})
    assert not body_has_images({"input": "hi"})


# --- answers out --------------------------------------------------------------------------------


def test_a_whole_response_validates_as_the_sdk_type() -> None:
    body = answer([ThinkingDelta("hm"), TextDelta("Hel"), TextDelta("lo"), Done("stop", USAGE)],
                  instructions="Be terse.", tools=[], temperature=1.0, top_p=1.0, max_output_tokens=None,
                  text={"format": {"type": "text"}}, reasoning=None)
    parsed = Response.model_validate(body)
    assert parsed.status == "completed" and parsed.output_text == "Hello" and parsed.instructions == "Be terse."
    assert [item.type for item in parsed.output] == ["reasoning", "message"]
    assert parsed.output[0].summary[0].text == "hm"
    assert (parsed.usage.input_tokens, parsed.usage.output_tokens, parsed.usage.total_tokens) == (7, 3, 10)


def test_tool_calls_and_a_length_stop() -> None:
    body = answer([TextDelta("Checking."), ToolCallDelta(ToolCall("f", {"x": 1}, None, 0)), Done("length", USAGE)])
    parsed = Response.model_validate(body)
    assert [item.type for item in parsed.output] == ["message", "function_call"]
    call = parsed.output[1]
    assert call.call_id.startswith("call_") and json.loads(call.arguments) == {"x": 1}
    assert parsed.status == "incomplete" and parsed.incomplete_details.reason == "max_output_tokens"
    only_call = answer([ToolCallDelta(ToolCall("f", {}, "call_7", 0)), Done()])
    assert [item["type"] for item in only_call["output"]] == ["function_call"]


def test_the_stream_sequence() -> None:
    events: list[ChatEvent] = [ThinkingDelta("a"), TextDelta("Hi"), TextDelta("!"),
                               ToolCallDelta(ToolCall("f", {"x": 1}, "call_9", 0)), Done("stop", USAGE)]
    out = sse(responses_sse_from_events(events, model="m", response_id="resp_abc", created=1, echo={}))
    assert [e["type"] for e in out] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    assert [e["output_index"] for e in out if e["type"] == "response.output_item.added"] == [0, 1, 2]
    # Every event about one item names the same item id.
    message_events = [e for e in out[6:13] if "item_id" in e]
    assert len({e["item_id"] for e in message_events}) == 1 and message_events[0]["item_id"] == out[6]["item"]["id"]
    final = Response.model_validate(out[-1]["response"])
    assert [i.type for i in final.output] == ["reasoning", "message", "function_call"]
    assert final.output_text == "Hi!" and final.usage.output_tokens == 3


def test_a_failure_mid_stream_is_error_then_response_failed() -> None:
    def failing() -> Iterator[ChatEvent]:
        yield TextDelta("Hi")
        raise ExpertStreamBroken("reset by /srv/secret")

    out = sse(responses_sse_from_events(failing(), model="m", response_id="resp_abc", created=1, echo={}))
    assert [e["type"] for e in out][-2:] == ["error", "response.failed"]
    assert out[-2]["message"] == STREAM_ERROR_MESSAGE
    assert out[-1]["response"]["status"] == "failed"
    assert out[-1]["response"]["error"] == {"code": "server_error", "message": STREAM_ERROR_MESSAGE}

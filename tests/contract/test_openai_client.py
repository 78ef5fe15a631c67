"""The real `openai` Python client against the real server, with each kind of router."""

from __future__ import annotations

import json

import openai
import pytest

from tests.contract.conftest import RoutedServer
from tests.fakes.fake_upstream import FakeUpstream

CODE_Q = [{"role": "user", "content": "fix the bug in my python script"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture
def base_url(routed_server: RoutedServer) -> str:
    return routed_server.url


@pytest.fixture
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"lemoe:latest", "coder:latest", "writer:latest", "fallback:latest"} <= ids
    assert client.models.retrieve("writer").id == "writer:latest"
    assert client.models.retrieve("writer:latest").owned_by
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_routed_non_streaming(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="lemoe", messages=CODE_Q)
    assert reply.choices[0].message.content == "Hello from coder-model"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.model == "lemoe" and reply.usage and reply.usage.total_tokens > 0


def test_chat_direct_to_openai_type_expert(client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    reply = client.chat.completions.create(model="writer", messages=[{"role": "user", "content": "hello"}],
                                           temperature=0.3, max_tokens=50, stop=["END"])
    assert reply.choices[0].message.content == "Hello from writer-model"
    forwarded = fake_upstream.requests_to("/v1/chat/completions")[-1].json
    assert forwarded["model"] == "writer-model" and forwarded["max_tokens"] == 50
    assert forwarded["temperature"] == 0.3 and forwarded["stop"] == ["END"]


def test_unknown_model_name_is_routed(client: openai.OpenAI, routed_server: RoutedServer) -> None:
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=CODE_Q)
    assert raw.headers["X-LeMoE-Expert"] == "coder"
    assert raw.headers["X-LeMoE-Route-Method"] == routed_server.routed_method
    assert raw.parse().choices[0].message.content == "Hello from coder-model"


def test_the_route_method_is_in_the_headers(client: openai.OpenAI, routed_server: RoutedServer) -> None:
    for stream in (False, True):
        raw = client.chat.completions.with_raw_response.create(model="lemoe", messages=CODE_Q, stream=stream)
        assert (raw.headers["X-LeMoE-Expert"], raw.headers["X-LeMoE-Route-Method"]) == \
            ("coder", routed_server.routed_method), stream
        assert float(raw.headers["X-LeMoE-Route-Score"]) > 0
        reply = raw.parse()
        text = "".join(c.choices[0].delta.content or "" for c in reply if c.choices) if stream \
            else reply.choices[0].message.content
        assert text == "Hello from coder-model"
    direct = client.chat.completions.with_raw_response.create(model="writer", messages=CODE_Q)
    assert (direct.headers["X-LeMoE-Expert"], direct.headers["X-LeMoE-Route-Method"]) == ("writer", "direct")


def test_a_follow_up_is_routed_with_its_conversation(client: openai.OpenAI) -> None:
    messages = [*CODE_Q, {"role": "assistant", "content": "Here is the fix."},
                {"role": "user", "content": "now make it shorter"}]
    raw = client.chat.completions.with_raw_response.create(model="lemoe", messages=messages)
    assert (raw.headers["X-LeMoE-Expert"], raw.headers["X-LeMoE-Route-Method"]) == ("coder", "cascade")


def test_chat_streaming_with_usage(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="lemoe", messages=CODE_Q, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from coder-model"
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_tool_calls_pass_through(client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("writer-model", tool_call=("get_weather", {"city": "Tokyo"}))
    reply = client.chat.completions.create(model="writer", messages=[{"role": "user", "content": "weather?"}],
                                           tools=[WEATHER_TOOL])
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Tokyo"}
    assert reply.choices[0].finish_reason == "tool_calls"
    assert fake_upstream.requests_to("/v1/chat/completions")[-1].json["tools"][0]["function"]["name"] == "get_weather"

    chunks = list(client.chat.completions.create(model="writer", messages=[{"role": "user", "content": "weather?"}],
                                                 tools=[WEATHER_TOOL], stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function.name == "get_weather" and deltas[0].index == 0
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "Tokyo"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_tool_result_turn_is_forwarded(client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    messages = [
        {"role": "user", "content": "weather in Tokyo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Tokyo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    client.chat.completions.create(model="coder", messages=messages, tools=[WEATHER_TOOL])
    sent = fake_upstream.requests_to("/api/chat")[-1].json["messages"]
    assert sent[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Tokyo"}
    assert sent[2]["role"] == "tool" and sent[2]["content"] == "sunny"


def test_legacy_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="coder", prompt="def add(a, b):")
    assert reply.choices[0].text == "Hello from coder-model"
    pieces = list(client.completions.create(model="coder", prompt="def add(a, b):", stream=True))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == "Hello from coder-model"


def test_errors_raise_the_right_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="lemoe", messages=[])
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="lemoe", messages=[{"role": "user", "content": "x"}],
                                       temperature="hot")  # type: ignore[arg-type]
    assert "temperature" in str(info.value)


def test_fallback_expert_really_generates(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="lemoe", messages=[{"role": "user", "content": "Say hello."}], max_tokens=16)
    reply = raw.parse()
    assert (raw.headers["X-LeMoE-Expert"], raw.headers["X-LeMoE-Route-Method"]) == ("fallback", "fallback")
    assert reply.choices[0].message.content.strip()
    assert reply.choices[0].finish_reason in ("stop", "length")

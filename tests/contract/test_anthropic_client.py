"""The real `anthropic` Python client against the real server's /v1/messages (Claude Code's API)."""

from __future__ import annotations

import anthropic
import pytest
import requests

from tests.contract.conftest import RoutedServer
from tests.fakes.fake_upstream import FakeUpstream

CODE_Q = [{"role": "user", "content": "fix the bug in my python script"}]
WEATHER_TOOL = {"name": "get_weather", "description": "Weather for a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture
def client(base_url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base_url, api_key="unused", max_retries=0)


def test_messages_create_is_routed_like_chat(client: anthropic.Anthropic, lemoe_server: RoutedServer) -> None:
    raw = client.messages.with_raw_response.create(model="claude-sonnet-4-5", max_tokens=64, messages=CODE_Q)
    assert (raw.headers["X-LeMoE-Expert"], raw.headers["X-LeMoE-Route-Method"]) == \
        ("coder", lemoe_server.routed_method)
    assert float(raw.headers["X-LeMoE-Route-Score"]) > 0
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant"
    assert message.model == "claude-sonnet-4-5"
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "Hello from coder-model"
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 5 and message.usage.output_tokens == 3


def test_options_and_system_reach_the_expert(client: anthropic.Anthropic, fake_upstream: FakeUpstream) -> None:
    # This client no longer has sampling arguments; Claude Code and older clients still send them.
    client.messages.create(model="coder", max_tokens=50, extra_body={"temperature": 0.3, "top_p": 0.9, "top_k": 20},
                           stop_sequences=["END"], system=[{"type": "text", "text": "Be terse."}],
                           messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    sent = fake_upstream.requests_to("/api/chat")[-1].json
    assert sent["model"] == "coder-model"
    assert sent["messages"][0] == {"role": "system", "content": "Be terse."}
    assert sent["messages"][1]["content"] == "hi"
    assert sent["options"] == {"num_predict": 50, "temperature": 0.3, "top_p": 0.9, "top_k": 20, "stop": ["END"]}


def test_streaming_events_in_order(client: anthropic.Anthropic) -> None:
    raw = client.messages.with_raw_response.create(model="lemoe", max_tokens=64, messages=CODE_Q, stream=True)
    assert raw.headers["X-LeMoE-Expert"] == "coder"
    events = list(raw.parse())
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 1
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text == "Hello from coder-model"
    delta = events[-2]
    assert delta.delta.stop_reason == "end_turn" and delta.usage.output_tokens == 3


def test_the_stream_helper_accumulates_the_message(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model="writer", max_tokens=64, messages=[{"role": "user", "content": "a poem"}]) as s:
        pieces = list(s.text_stream)
        final = s.get_final_message()
    assert "".join(pieces) == "Hello from writer-model"
    assert final.content[0].text == "Hello from writer-model"
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0


@pytest.mark.parametrize("model", ["coder", "writer"])  # an Ollama and an OpenAI-compatible expert
def test_a_tool_call_round_trip(client: anthropic.Anthropic, fake_upstream: FakeUpstream, model: str) -> None:
    upstream_model = f"{model}-model"
    fake_upstream.behave(upstream_model, tool_call=("get_weather", {"city": "Tokyo"}))
    question = {"role": "user", "content": "weather in Tokyo?"}
    first = client.messages.create(model=model, max_tokens=64, tools=[WEATHER_TOOL], messages=[question])
    assert first.stop_reason == "tool_use"
    call = next(b for b in first.content if b.type == "tool_use")
    assert call.name == "get_weather" and call.input == {"city": "Tokyo"} and call.id

    with client.messages.stream(model=model, max_tokens=64, tools=[WEATHER_TOOL], messages=[question]) as s:
        streamed = s.get_final_message()
    streamed_call = next(b for b in streamed.content if b.type == "tool_use")
    assert streamed_call.input == {"city": "Tokyo"} and streamed.stop_reason == "tool_use"

    fake_upstream.reset()
    answer = client.messages.create(model=model, max_tokens=64, tools=[WEATHER_TOOL], messages=[
        question,
        {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]},
    ])
    assert answer.content[0].text == f"Hello from {upstream_model}"
    if model == "coder":
        sent = fake_upstream.requests_to("/api/chat")[-1].json
        assert sent["tools"][0]["function"]["name"] == "get_weather"
        function = sent["messages"][1]["tool_calls"][0]["function"]
        assert (function["name"], function["arguments"]) == ("get_weather", {"city": "Tokyo"})
        result = sent["messages"][2]
        assert (result["role"], result["content"], result["tool_name"]) == ("tool", "sunny", "get_weather")
    else:
        sent = fake_upstream.requests_to("/v1/chat/completions")[-1].json
        assert sent["messages"][1]["tool_calls"][0]["id"] == call.id
        assert sent["messages"][2] == {"role": "tool", "tool_call_id": call.id, "content": "sunny"}


def test_thinking_is_switched_on_and_comes_back_as_a_block(client: anthropic.Anthropic,
                                                           fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("coder-model", thinking=["Let me", " think."])
    message = client.messages.create(model="coder", max_tokens=256, messages=CODE_Q,
                                     thinking={"type": "enabled", "budget_tokens": 128})
    assert fake_upstream.requests_to("/api/chat")[-1].json["think"] is True
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "Let me think."
    with client.messages.stream(model="coder", max_tokens=256, messages=CODE_Q,
                                thinking={"type": "enabled", "budget_tokens": 128}) as s:
        final = s.get_final_message()
    assert final.content[0].thinking == "Let me think." and final.content[1].text == "Hello from coder-model"


def test_errors_are_anthropic_errors(client: anthropic.Anthropic, base_url: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model="lemoe", max_tokens=64, messages=[])
    assert info.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model="lemoe", max_tokens=64, extra_body={"temperature": 1.5}, messages=CODE_Q)
    assert "temperature" in info.value.message
    missing = requests.post(base_url + "/v1/messages", json={"model": "x", "messages": CODE_Q}, timeout=10)
    assert missing.status_code == 400
    assert missing.json() == {"type": "error", "error": {"type": "invalid_request_error",
                                                         "message": "max_tokens: Field required"}}
    unknown = requests.get(base_url + "/v1/messages/batches", timeout=10)
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"


def test_an_expert_dropping_mid_stream_ends_in_an_error_event(client: anthropic.Anthropic,
                                                              fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("coder-model", drop_after=1)
    with pytest.raises(anthropic.APIStatusError) as info:
        with client.messages.stream(model="coder", max_tokens=64, messages=CODE_Q) as s:
            for _ in s.text_stream:
                pass
    assert info.value.body["error"]["type"] == "api_error"
    assert "Traceback" not in info.value.message and "/" not in info.value.body["error"]["message"]


def test_an_expert_down_before_its_first_token_falls_back_silently(client: anthropic.Anthropic) -> None:
    raw = client.messages.with_raw_response.create(model="lemoe", max_tokens=12,
                                                   messages=[{"role": "user", "content": "my docker build fails"}])
    assert raw.headers["X-LeMoE-Expert"] == "fallback"
    assert raw.parse().content[0].text.strip()


def test_count_tokens(client: anthropic.Anthropic) -> None:
    short = client.messages.count_tokens(model="lemoe", messages=[{"role": "user", "content": "hi"}])
    longer = client.messages.count_tokens(model="lemoe", system="x" * 400, messages=[{"role": "user", "content": "hi"}])
    assert short.input_tokens >= 0 and longer.input_tokens >= short.input_tokens + 100

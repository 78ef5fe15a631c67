"""The real `openai` client's Responses API (`client.responses`) against the real server."""

from __future__ import annotations

import json

import openai
import pytest
import requests

from tests.contract.conftest import RoutedServer
from tests.fakes.fake_upstream import FakeUpstream

CODE_Q = "fix the bug in my python script"
WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Weather for a city", "strict": False,
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


def test_a_string_input_is_routed_like_chat(client: openai.OpenAI, lemoe_server: RoutedServer) -> None:
    raw = client.responses.with_raw_response.create(model="gpt-5", input=CODE_Q)
    assert (raw.headers["X-LeMoE-Expert"], raw.headers["X-LeMoE-Route-Method"]) == \
        ("coder", lemoe_server.routed_method)
    assert float(raw.headers["X-LeMoE-Route-Score"]) > 0
    response = raw.parse()
    assert response.object == "response" and response.status == "completed" and response.model == "gpt-5"
    assert response.output_text == "Hello from coder-model"
    assert [item.type for item in response.output] == ["message"]
    assert response.output[0].content[0].type == "output_text" and response.output[0].content[0].annotations == []
    assert response.usage.input_tokens == 5 and response.usage.output_tokens == 3 and response.usage.total_tokens == 8


def test_instructions_items_and_options_reach_the_expert(client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    response = client.responses.create(
        model="coder", instructions="Be terse.", max_output_tokens=40, temperature=0.2, top_p=0.5,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
               {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]},
               {"role": "user", "content": "again"}],
        text={"format": {"type": "json_schema", "name": "reply", "schema": {"type": "object"}}},
        reasoning={"effort": "low"})
    assert response.instructions == "Be terse." and response.max_output_tokens == 40
    sent = fake_upstream.requests_to("/api/chat")[-1].json
    assert [(m["role"], m["content"]) for m in sent["messages"]] == [
        ("system", "Be terse."), ("user", "hi"), ("assistant", "Hello."), ("user", "again")]
    assert sent["options"] == {"num_predict": 40, "temperature": 0.2, "top_p": 0.5}
    assert sent["format"] == {"type": "object"} and sent["think"] == "low"


def test_streaming_events_in_order(client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(model="lemoe", input=CODE_Q, stream=True)
    assert raw.headers["X-LeMoE-Expert"] == "coder"
    events = list(raw.parse())
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello from coder-model"
    assert events[-1].response.output_text == "Hello from coder-model"
    assert events[-1].response.usage.output_tokens == 3


def test_the_stream_helper_gives_the_final_response(client: openai.OpenAI) -> None:
    with client.responses.stream(model="writer", input="a poem") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "Hello from writer-model" and final.output_text == "Hello from writer-model"


@pytest.mark.parametrize("model", ["coder", "writer"])  # an Ollama and an OpenAI-compatible expert
def test_a_function_call_round_trip(client: openai.OpenAI, fake_upstream: FakeUpstream, model: str) -> None:
    fake_upstream.behave(f"{model}-model", tool_call=("get_weather", {"city": "Tokyo"}))
    first = client.responses.create(model=model, input="weather in Tokyo?", tools=[WEATHER_TOOL])
    call = next(item for item in first.output if item.type == "function_call")
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Tokyo"} and call.call_id

    events = list(client.responses.create(model=model, input="weather in Tokyo?", tools=[WEATHER_TOOL], stream=True))
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert json.loads(done.arguments) == {"city": "Tokyo"}
    assert any(e.type == "response.function_call_arguments.delta" for e in events)
    assert events[-1].type == "response.completed"
    assert [i.type for i in events[-1].response.output] == ["function_call"]

    fake_upstream.reset()
    answer = client.responses.create(model=model, tools=[WEATHER_TOOL], input=[
        {"role": "user", "content": "weather in Tokyo?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
    ])
    assert answer.output_text == f"Hello from {model}-model"
    if model == "coder":
        sent = fake_upstream.requests_to("/api/chat")[-1].json
        assert sent["tools"][0]["function"]["name"] == "get_weather"
        assert sent["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Tokyo"}
        assert (sent["messages"][2]["role"], sent["messages"][2]["content"]) == ("tool", "sunny")
        assert sent["messages"][2]["tool_name"] == "get_weather"
    else:
        sent = fake_upstream.requests_to("/v1/chat/completions")[-1].json
        assert sent["messages"][1]["tool_calls"][0]["id"] == call.call_id
        assert sent["messages"][2] == {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}


def test_reasoning_comes_back_as_a_reasoning_item(client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("coder-model", thinking=["Let me", " think."])
    response = client.responses.create(model="coder", input=CODE_Q, reasoning={"effort": "high"})
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].summary[0].text == "Let me think."
    events = list(client.responses.create(model="coder", input=CODE_Q, reasoning={"effort": "high"}, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_summary_text.delta") == "Let me think."
    assert [i.type for i in events[-1].response.output] == ["reasoning", "message"]


def test_a_short_limit_makes_an_incomplete_response(client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("coder-model", done_reason="length")
    response = client.responses.create(model="coder", input=CODE_Q, max_output_tokens=16)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"


def test_errors_are_openai_errors(client: openai.OpenAI, base_url: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="lemoe", input=[])
    assert info.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="lemoe", input=CODE_Q, previous_response_id="resp_123")
    assert "previous_response_id" in info.value.message
    bad = requests.post(base_url + "/v1/responses", json={"input": CODE_Q, "temperature": "hot"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert "temperature" in bad.json()["error"]["message"]


def test_an_expert_dropping_mid_stream_ends_in_response_failed(client: openai.OpenAI,
                                                               fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("coder-model", drop_after=1)
    events = list(client.responses.create(model="coder", input=CODE_Q, stream=True))
    assert [e.type for e in events][-2:] == ["error", "response.failed"]
    assert events[-1].response.status == "failed" and events[-1].response.error.code == "server_error"
    assert "/" not in events[-2].message


def test_an_expert_down_before_its_first_token_falls_back_silently(client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(model="lemoe", input="my docker build fails",
                                                    max_output_tokens=12)
    assert raw.headers["X-LeMoE-Expert"] == "fallback"
    assert raw.parse().output_text.strip()

"""Reasoning passes through both ways on the Ollama and OpenAI chat routes, with the real clients
and the loopback upstream reasoning before it answers."""

from __future__ import annotations

import ollama
import openai
import pytest

from tests.fakes.fake_upstream import FakeUpstream

THOUGHTS = ["Let me", " think."]
ASK = [{"role": "user", "content": "fix the bug in my python script"}]


@pytest.fixture
def thinking_upstream(fake_upstream: FakeUpstream) -> FakeUpstream:
    for model in ("coder-model", "writer-model"):
        fake_upstream.behave(model, thinking=THOUGHTS)
    return fake_upstream


def test_ollama_chat_think_goes_out_and_thinking_comes_back(base_url: str, thinking_upstream: FakeUpstream) -> None:
    client = ollama.Client(host=base_url)
    reply = client.chat(model="coder", messages=ASK, think="high")
    assert thinking_upstream.requests_to("/api/chat")[-1].json["think"] == "high"
    assert reply.message.thinking == "Let me think." and reply.message.content == "Hello from coder-model"
    parts = list(client.chat(model="coder", messages=ASK, think=True, stream=True))
    assert thinking_upstream.requests_to("/api/chat")[-1].json["think"] is True
    assert "".join(p.message.thinking or "" for p in parts) == "Let me think."
    # An earlier turn's reasoning is handed back to the expert.
    history = [*ASK, {"role": "assistant", "content": "Done.", "thinking": "I fixed it."},
               {"role": "user", "content": "thanks"}]
    client.chat(model="coder", messages=history, think=False)
    sent = thinking_upstream.requests_to("/api/chat")[-1].json
    assert sent["think"] is False and sent["messages"][1]["thinking"] == "I fixed it."


def test_ollama_generate_think(base_url: str, thinking_upstream: FakeUpstream) -> None:
    client = ollama.Client(host=base_url)
    reply = client.generate(model="coder", prompt="def add(a, b):", think="low")
    assert thinking_upstream.requests_to("/api/generate")[-1].json["think"] == "low"
    assert reply.thinking == "Let me think." and reply.response == "Hello from coder-model"
    parts = list(client.generate(model="coder", prompt="def add(a, b):", think=True, stream=True))
    assert "".join(p.thinking or "" for p in parts) == "Let me think."


@pytest.mark.parametrize("model", ["coder", "writer"])  # reasoning from an Ollama and an OpenAI-compatible expert
def test_openai_reasoning_effort_and_reasoning_content(base_url: str, thinking_upstream: FakeUpstream,
                                                       model: str) -> None:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model=model, messages=ASK, reasoning_effort="medium")
    assert reply.choices[0].message.model_extra["reasoning_content"] == "Let me think."
    assert reply.choices[0].message.content == f"Hello from {model}-model"
    if model == "coder":
        assert thinking_upstream.requests_to("/api/chat")[-1].json["think"] == "medium"
    else:
        assert thinking_upstream.requests_to("/v1/chat/completions")[-1].json["reasoning_effort"] == "medium"
    chunks = list(client.chat.completions.create(model=model, messages=ASK, reasoning_effort="high", stream=True))
    assert "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                   for c in chunks if c.choices) == "Let me think."

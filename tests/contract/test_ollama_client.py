"""The real `ollama` Python client against the real server."""

from __future__ import annotations

import ollama
import pytest

from tests.fakes.fake_upstream import FakeUpstream

CODE_Q = [{"role": "user", "content": "escribe una función en python"}]


@pytest.fixture
def client(base_url: str) -> ollama.Client:
    return ollama.Client(host=base_url)


def test_list_show_ps(client: ollama.Client) -> None:
    names = {m.model for m in client.list().models}
    assert {"lemoe:latest", "coder:latest", "writer:latest", "fallback:latest"} <= names
    shown = client.show("coder")
    assert shown.modelinfo is not None and shown.details.format
    assert isinstance(client.ps().models, list)
    with pytest.raises(ollama.ResponseError) as info:
        client.show("no-such-model")
    assert info.value.status_code == 404


def test_chat_routed(client: ollama.Client) -> None:
    reply = client.chat(model="lemoe", messages=CODE_Q)
    assert reply.message.role == "assistant" and reply.message.content == "Hello from coder-model"
    assert reply.done and reply.done_reason == "stop" and reply.eval_count


def test_chat_streaming(client: ollama.Client) -> None:
    parts = list(client.chat(model="lemoe", messages=CODE_Q, stream=True))
    assert "".join(p.message.content or "" for p in parts) == "Hello from coder-model"
    assert parts[-1].done and not any(p.done for p in parts[:-1])


def test_chat_to_openai_type_expert_by_name_with_tag(client: ollama.Client) -> None:
    assert client.chat(model="writer:latest", messages=[{"role": "user", "content": "hi"}]).message.content \
        == "Hello from writer-model"


def test_generate(client: ollama.Client) -> None:
    assert client.generate(model="coder", prompt="python please").response == "Hello from coder-model"
    parts = list(client.generate(model="coder", prompt="python please", stream=True))
    assert "".join(p.response for p in parts) == "Hello from coder-model" and parts[-1].done


def test_options_and_format_are_forwarded(client: ollama.Client, fake_upstream: FakeUpstream) -> None:
    client.chat(model="coder", messages=CODE_Q, options={"temperature": 0.1, "num_predict": 42}, format="json")
    body = fake_upstream.requests_to("/api/chat")[-1].json
    assert body["model"] == "coder-model" and body["format"] == "json"
    assert body["options"]["temperature"] == 0.1 and body["options"]["num_predict"] == 42


def test_tool_calls_pass_through(client: ollama.Client, fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("coder-model", tool_call=("run_code", {"source": "print(1)"}))

    def run_code(source: str) -> str:
        """Run Python code.

        Args:
            source: the code
        """
        return source

    reply = client.chat(model="coder", messages=CODE_Q, tools=[run_code])
    call = reply.message.tool_calls[0]
    assert call.function.name == "run_code" and call.function.arguments == {"source": "print(1)"}
    assert fake_upstream.requests_to("/api/chat")[-1].json["tools"][0]["function"]["name"] == "run_code"
    streamed = [tc for p in client.chat(model="coder", messages=CODE_Q, tools=[run_code], stream=True)
                for tc in (p.message.tool_calls or [])]
    assert streamed[0].function.arguments == {"source": "print(1)"}


def test_errors(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model="lemoe", prompt="x", raw=True, system="be brief")
    assert info.value.status_code == 400 and "raw" in info.value.error


def test_fallback_expert_really_generates(client: ollama.Client) -> None:
    reply = client.chat(model="fallback", messages=[{"role": "user", "content": "Say hello."}],
                        options={"num_predict": 16})
    assert reply.message.content.strip() and reply.eval_count and reply.eval_count > 0
    loaded = {m.model for m in client.ps().models}
    assert "fallback:latest" in loaded

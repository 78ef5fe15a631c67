"""The real `ollama` Python client against the real server, with each kind of router.

The client hides response headers, so the routing headers are read with httpx, the HTTP library
the client itself sends with, on the same requests.
"""

from __future__ import annotations

import json

import httpx
import ollama
import pytest

from tests.contract.conftest import RoutedServer
from tests.fakes.fake_upstream import FakeUpstream

CODE_Q = [{"role": "user", "content": "escribe una función en python"}]


@pytest.fixture
def base_url(routed_server: RoutedServer) -> str:
    return routed_server.url


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


def test_the_route_method_is_in_the_headers(base_url: str, routed_server: RoutedServer) -> None:
    for stream in (False, True):
        body = {"model": "lemoe", "messages": CODE_Q, "stream": stream}
        with httpx.stream("POST", base_url + "/api/chat", json=body, timeout=30) as reply:
            reply.read()
        assert reply.status_code == 200
        assert (reply.headers["X-LeMoE-Expert"], reply.headers["X-LeMoE-Route-Method"]) == \
            ("coder", routed_server.routed_method), stream
        lines = [json.loads(line) for line in reply.text.splitlines()] if stream else [reply.json()]
        assert "".join(line["message"]["content"] for line in lines) == "Hello from coder-model"
    generated = httpx.post(base_url + "/api/generate", json={"model": "lemoe", "prompt": CODE_Q[0]["content"],
                                                              "stream": False}, timeout=30)
    assert generated.json()["response"] == "Hello from coder-model"
    assert generated.headers["X-LeMoE-Route-Method"] == routed_server.routed_method
    direct = httpx.post(base_url + "/api/chat", json={"model": "writer", "messages": CODE_Q, "stream": False},
                        timeout=30)
    assert (direct.headers["X-LeMoE-Expert"], direct.headers["X-LeMoE-Route-Method"]) == ("writer", "direct")


def test_a_follow_up_is_routed_with_its_conversation(base_url: str) -> None:
    messages = [*CODE_Q, {"role": "assistant", "content": "Aquí está."}, {"role": "user", "content": "hazlo más corto"}]
    reply = httpx.post(base_url + "/api/chat", json={"model": "lemoe", "messages": messages, "stream": False},
                       timeout=30)
    assert (reply.headers["X-LeMoE-Expert"], reply.headers["X-LeMoE-Route-Method"]) == ("coder", "cascade")


def test_an_unrelated_question_reaches_the_fallback_expert(base_url: str) -> None:
    body = {"model": "lemoe", "messages": [{"role": "user", "content": "Say hello."}], "stream": False,
            "options": {"num_predict": 8}}
    reply = httpx.post(base_url + "/api/chat", json=body, timeout=60)
    assert (reply.headers["X-LeMoE-Expert"], reply.headers["X-LeMoE-Route-Method"]) == ("fallback", "fallback")
    assert reply.json()["message"]["content"].strip()


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

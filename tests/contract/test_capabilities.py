"""Capabilities before meaning, through the real `ollama` and `openai` clients and a real server.

A server of its own (gunicorn on a free loopback port) whose experts declare capabilities: the
fallback is the real packaged SmolLM2 (json only, the window of local_models.n_ctx), the others
answer from the loopback fake upstream, which records which model each request reached.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
import requests

from tests.contract.conftest import SMOLLM
from tests.fakes.fake_upstream import FakeUpstream, reserve_closed_port
from tests.live_server import live_server

# A 1x1 PNG.
PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
PNG = base64.b64decode(PNG_B64)
TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
# The coder's meaning wins this text (three of its keywords against one of the eyes').
CODE_AND_PHOTO = "fix the bug in this python script, see the photo"
N_CTX = 1024


def write_project(root: Path, upstream: str, closed: str) -> Path:
    (root / "config").mkdir(parents=True)
    (root / "models").mkdir()

    def remote(i: int, label: str, kind: str, keywords: list[str], caps: list[str], context: int,
               url: str = upstream) -> dict[str, Any]:
        return {"id": i, "label": label, "description": f"{label} expert", "keywords": keywords, "type": kind,
                "url": url, "model_name": f"{label}-model", "capabilities": caps, "context_length": context}

    experts = {"experts": [
        {"id": 0, "label": "fallback", "description": "General fallback model.", "type": "local",
         "format": "gguf", "model_path": SMOLLM, "capabilities": ["completion", "json"]},
        remote(1, "coder", "ollama", ["python", "code", "function", "script", "bug"], ["tools", "json"], 8192),
        remote(2, "eyes", "openai", ["photo", "picture", "screenshot"], ["vision"], 8192),
        remote(3, "longdoc", "ollama", ["summarize", "report"], ["json"], 65536),
        remote(4, "blind", "ollama", ["diagram", "chart"], ["vision"], 8192, closed),
    ]}
    config = {
        "server": {"host": "127.0.0.1", "threads": 16, "connect_timeout": 1, "read_timeout": 5,
                   "log_file": "logs/lemoe.log", "expert_cooldown_seconds": 0},
        "router": {"model_path": "", "categories_file": "config/experts.json"},
        "local_models": {"n_ctx": N_CTX, "n_threads": 2},
        "rate_limit": {"per_minute": 0},
    }
    (root / "config" / "experts.json").write_text(json.dumps(experts, indent=2))
    path = root / "config" / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture(scope="module")
def url(fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    project = tmp_path_factory.mktemp("capabilities")
    with reserve_closed_port() as closed_port:
        config = write_project(project, fake_upstream.url, f"http://127.0.0.1:{closed_port}")
        with live_server(config, project) as server:
            yield server.url


class Headers:
    """The last response's headers, captured by an httpx event hook inside the real client."""

    def __init__(self) -> None:
        self.last: httpx.Headers | None = None

    def __call__(self, response: httpx.Response) -> None:
        self.last = response.headers

    def __getitem__(self, name: str) -> str:
        assert self.last is not None
        return self.last[name]


@pytest.fixture
def seen() -> Headers:
    return Headers()


@pytest.fixture
def ollama_client(url: str, seen: Headers) -> ollama.Client:
    return ollama.Client(host=url, event_hooks={"response": [seen]})


@pytest.fixture
def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def models_reached(upstream: FakeUpstream) -> list[str]:
    return [r.json["model"] for r in upstream.requests if r.method == "POST" and isinstance(r.json, dict)]


# --- listings ------------------------------------------------------------------------------------

def test_show_reports_each_experts_capabilities_and_lemoe_the_union(ollama_client: ollama.Client) -> None:
    eyes = ollama_client.show("eyes")
    assert eyes.capabilities == ["completion", "vision"]
    assert eyes.modelinfo is not None and eyes.modelinfo["openai.context_length"] == 8192
    assert eyes.parameters is not None and eyes.parameters.split() == ["num_ctx", "8192"]
    coder = ollama_client.show("coder:latest")
    assert coder.capabilities == ["completion", "tools"]  # json is routing knowledge, not an Ollama name
    assert coder.template is not None and "Tools" in coder.template
    fallback = ollama_client.show("fallback")
    assert fallback.capabilities == ["completion"]
    assert fallback.template is not None and "Tools" not in fallback.template  # LiteLLM: no native tools
    assert fallback.modelinfo is not None and fallback.modelinfo["llama.context_length"] == N_CTX
    lemoe = ollama_client.show("lemoe")
    assert lemoe.capabilities == ["completion", "tools", "vision"]
    assert lemoe.modelinfo is not None and lemoe.modelinfo["lemoe.context_length"] == 65536


def test_tags_list_capabilities_as_recent_ollama_does(url: str, ollama_client: ollama.Client) -> None:
    body = requests.get(url + "/api/tags", timeout=10).json()
    caps = {m["name"]: m["capabilities"] for m in body["models"]}
    assert caps == {"lemoe:latest": ["completion", "tools", "vision"], "fallback:latest": ["completion"],
                    "coder:latest": ["completion", "tools"], "eyes:latest": ["completion", "vision"],
                    "longdoc:latest": ["completion"], "blind:latest": ["completion", "vision"],
                    # The local encoder, which serves /api/embed out of the box.
                    "use-multilingual:latest": ["embedding"]}
    assert {m.model for m in ollama_client.list().models} == set(caps)  # the client still parses it


# --- routing among capable experts ---------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_image_chat_goes_only_to_a_vision_expert_ollama(ollama_client: ollama.Client, seen: Headers,
                                                         fake_upstream: FakeUpstream, stream: bool) -> None:
    messages = [{"role": "user", "content": CODE_AND_PHOTO, "images": [PNG]}]
    if stream:
        text = "".join(p.message.content or "" for p in ollama_client.chat(model="lemoe", messages=messages,
                                                                           stream=True))
    else:
        text = ollama_client.chat(model="lemoe", messages=messages).message.content
    assert text == "Hello from eyes-model"
    assert seen["X-LeMoE-Expert"] == "eyes" and seen["X-LeMoE-Route-Method"] == "capability"
    assert models_reached(fake_upstream) == ["eyes-model"]
    parts = fake_upstream.requests_to("/v1/chat/completions")[-1].json["messages"][-1]["content"]
    assert {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}} in parts


@pytest.mark.parametrize("stream", [False, True])
def test_image_chat_goes_only_to_a_vision_expert_openai(openai_client: openai.OpenAI, fake_upstream: FakeUpstream,
                                                         stream: bool) -> None:
    content = [{"type": "text", "text": CODE_AND_PHOTO},
               {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}}]
    raw = openai_client.chat.completions.with_raw_response.create(
        model="lemoe", messages=[{"role": "user", "content": content}], stream=stream)  # type: ignore[call-overload]
    assert raw.headers["X-LeMoE-Expert"] == "eyes" and raw.headers["X-LeMoE-Route-Method"] == "capability"
    parsed = raw.parse()
    text = ("".join(c.choices[0].delta.content or "" for c in parsed if c.choices) if stream
            else parsed.choices[0].message.content)
    assert text == "Hello from eyes-model"
    assert models_reached(fake_upstream) == ["eyes-model"]


def test_text_alone_still_goes_where_its_meaning_says(ollama_client: ollama.Client, seen: Headers) -> None:
    reply = ollama_client.chat(model="lemoe", messages=[{"role": "user", "content": CODE_AND_PHOTO}])
    assert reply.message.content == "Hello from coder-model"
    assert seen["X-LeMoE-Expert"] == "coder" and seen["X-LeMoE-Route-Method"] == "keyword"


def test_tools_go_only_to_a_tools_expert_on_both_apis(ollama_client: ollama.Client, seen: Headers,
                                                       openai_client: openai.OpenAI,
                                                       fake_upstream: FakeUpstream) -> None:
    question = [{"role": "user", "content": "what is in this picture of the sky"}]
    reply = ollama_client.chat(model="lemoe", messages=question, tools=[TOOL])
    assert reply.message.content == "Hello from coder-model" and seen["X-LeMoE-Expert"] == "coder"
    raw = openai_client.chat.completions.with_raw_response.create(model="lemoe", messages=question, tools=[TOOL])
    assert raw.headers["X-LeMoE-Expert"] == "coder" and raw.headers["X-LeMoE-Route-Method"] == "capability"
    assert raw.parse().choices[0].message.content == "Hello from coder-model"
    assert models_reached(fake_upstream) == ["coder-model", "coder-model"]
    assert all(r.json["tools"][0]["function"]["name"] == "get_weather" for r in fake_upstream.requests_to("/api/chat"))
    # Without tools the same question is the eyes' business.
    ollama_client.chat(model="lemoe", messages=question)
    assert seen["X-LeMoE-Expert"] == "eyes"


def test_a_long_prompt_goes_only_to_an_expert_whose_context_holds_it(
        ollama_client: ollama.Client, seen: Headers, openai_client: openai.OpenAI,
        fake_upstream: FakeUpstream) -> None:
    long_code = "please fix this python function\n" + "x = compute(x) + 1\n" * 2500  # about 12,000 tokens
    reply = ollama_client.chat(model="lemoe", messages=[{"role": "user", "content": long_code}])
    assert reply.message.content == "Hello from longdoc-model"
    assert seen["X-LeMoE-Expert"] == "longdoc" and seen["X-LeMoE-Route-Method"] == "capability"
    raw = openai_client.chat.completions.with_raw_response.create(
        model="lemoe", messages=[{"role": "user", "content": long_code}])
    assert raw.headers["X-LeMoE-Expert"] == "longdoc"
    assert models_reached(fake_upstream) == ["longdoc-model", "longdoc-model"]
    short = ollama_client.chat(model="lemoe", messages=[{"role": "user", "content": "please fix this python function"}])
    assert short.message.content == "Hello from coder-model"


def test_dry_run_route_shows_the_restricted_decision(url: str) -> None:
    body = {"messages": [{"role": "user", "content": "what is in this picture"}], "tools": [TOOL]}
    decision = requests.post(url + "/v1/route", json=body, timeout=10).json()
    assert decision["expert"] == "coder" and decision["method"] == "capability"


# --- nobody can serve it: a clear client error ----------------------------------------------------

def test_thinking_nobody_has_is_ollamas_400(ollama_client: ollama.Client, fake_upstream: FakeUpstream) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        ollama_client.chat(model="lemoe", messages=[{"role": "user", "content": "fix my python"}], think=True)
    assert info.value.status_code == 400 and info.value.error == '"lemoe:latest" does not support thinking'
    with pytest.raises(ollama.ResponseError) as info:
        list(ollama_client.chat(model="lemoe", messages=[{"role": "user", "content": "hi"}], think=True, stream=True))
    assert info.value.status_code == 400
    assert models_reached(fake_upstream) == []


def test_fill_in_the_middle_nobody_has_is_a_400_on_both_apis(ollama_client: ollama.Client,
                                                              openai_client: openai.OpenAI) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        ollama_client.generate(model="lemoe", prompt="def add(a, b):\n    ", suffix="\n\nprint(add(1, 2))")
    assert info.value.status_code == 400 and info.value.error == "lemoe:latest does not support insert"
    with pytest.raises(openai.BadRequestError) as error:
        openai_client.completions.create(model="lemoe", prompt="def add(a, b):\n    ", suffix="\n")
    assert error.value.status_code == 400
    assert error.value.body["message"] == "lemoe:latest does not support insert"  # type: ignore[index]
    assert error.value.body["type"] == "invalid_request_error"  # type: ignore[index]


def test_a_prompt_longer_than_every_context_is_context_length_exceeded(
        openai_client: openai.OpenAI, ollama_client: ollama.Client, fake_upstream: FakeUpstream) -> None:
    huge = "summarize this report\n" + "lorem ipsum dolor sit amet " * 11000  # about 74,000 tokens
    with pytest.raises(openai.BadRequestError) as error:
        openai_client.chat.completions.create(model="lemoe", messages=[{"role": "user", "content": huge}])
    assert error.value.code == "context_length_exceeded"
    assert "65536 tokens" in error.value.message
    with pytest.raises(ollama.ResponseError) as info:
        ollama_client.chat(model="lemoe", messages=[{"role": "user", "content": huge}])
    assert info.value.status_code == 400 and "too small for this prompt" in info.value.error
    assert models_reached(fake_upstream) == []


def test_naming_an_expert_that_lacks_the_capability_gets_ollamas_error(
        ollama_client: ollama.Client, openai_client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        ollama_client.chat(model="coder", messages=[{"role": "user", "content": "what is this", "images": [PNG]}])
    assert info.value.status_code == 400 and info.value.error == "coder:latest does not support vision"
    with pytest.raises(openai.BadRequestError) as error:
        openai_client.chat.completions.create(model="eyes:latest", tools=[TOOL],
                                              messages=[{"role": "user", "content": "weather in Paris?"}])
    assert error.value.body["message"] == "eyes:latest does not support tools"  # type: ignore[index]
    assert models_reached(fake_upstream) == []
    # What it does take goes straight to it.
    assert ollama_client.chat(model="coder", tools=[TOOL],
                              messages=[{"role": "user", "content": "hi"}]).message.content == "Hello from coder-model"


# --- the silent fallback only to a fallback that can take the request ------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_no_silent_fallback_to_a_fallback_that_cannot_read_images(
        ollama_client: ollama.Client, openai_client: openai.OpenAI, stream: bool) -> None:
    # "blind" is the vision expert for diagrams, and its server is down.
    messages: list[dict[str, Any]] = [{"role": "user", "content": "explain this diagram", "images": [PNG]}]
    with pytest.raises(ollama.ResponseError) as info:
        reply = ollama_client.chat(model="lemoe", messages=messages, stream=stream)
        if stream:
            list(reply)  # type: ignore[arg-type]
    assert info.value.status_code == 503
    assert info.value.error == "no expert that supports vision is available to answer right now"
    content = [{"type": "text", "text": "explain this diagram"},
               {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}}]
    with pytest.raises(openai.InternalServerError) as error:
        openai_client.chat.completions.create(model="lemoe", messages=[{"role": "user", "content": content}],
                                              stream=stream)
    assert error.value.status_code == 503 and "supports vision" in error.value.message


def test_fallback_path_respects_tools_and_still_answers_what_the_fallback_can(
        ollama_client: ollama.Client, seen: Headers, fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("coder-model", fail_status=500)
    question = [{"role": "user", "content": "write a python function that adds two numbers"}]
    with pytest.raises(ollama.ResponseError) as info:
        ollama_client.chat(model="lemoe", messages=question, tools=[TOOL])
    assert info.value.status_code == 503 and "supports tools" in info.value.error
    # JSON is something the packaged SmolLM2 can do: the same failure is silently corrected.
    reply = ollama_client.chat(model="lemoe", messages=question, format="json", options={"num_predict": 8})
    assert seen["X-LeMoE-Expert"] == "fallback"
    assert reply.message.content and reply.message.content.lstrip().startswith("{")


# --- the Anthropic and Responses APIs route by the same capabilities --------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_image_and_tools_go_only_to_capable_experts(url: str, fake_upstream: FakeUpstream,
                                                              stream: bool) -> None:
    import anthropic

    client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}}
    raw = client.messages.with_raw_response.create(model="claude-sonnet-4-5", max_tokens=32, stream=stream,
                                                   messages=[{"role": "user", "content": [
                                                       {"type": "text", "text": CODE_AND_PHOTO}, image]}])
    assert (raw.headers["X-LeMoE-Expert"], raw.headers["X-LeMoE-Route-Method"]) == ("eyes", "capability")
    list(raw.parse()) if stream else raw.parse()
    tool = {"name": "get_weather", "input_schema": TOOL["function"]["parameters"]}  # type: ignore[index]
    raw = client.messages.with_raw_response.create(model="lemoe", max_tokens=32, stream=stream, tools=[tool],
                                                   messages=[{"role": "user", "content": "what is in this picture"}])
    assert (raw.headers["X-LeMoE-Expert"], raw.headers["X-LeMoE-Route-Method"]) == ("coder", "capability")
    list(raw.parse()) if stream else raw.parse()
    assert models_reached(fake_upstream) == ["eyes-model", "coder-model"]
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model="lemoe", max_tokens=32, messages=[{"role": "user", "content": "hi"}],
                               thinking={"type": "enabled", "budget_tokens": 1024})
    assert info.value.body["error"] == {"type": "invalid_request_error",
                                        "message": '"lemoe:latest" does not support thinking'}


def test_responses_image_goes_only_to_a_vision_expert(openai_client: openai.OpenAI,
                                                      fake_upstream: FakeUpstream) -> None:
    raw = openai_client.responses.with_raw_response.create(model="lemoe", input=[{"role": "user", "content": [
        {"type": "input_text", "text": CODE_AND_PHOTO},
        {"type": "input_image", "image_url": f"data:image/png;base64,{PNG_B64}", "detail": "auto"}]}])
    assert (raw.headers["X-LeMoE-Expert"], raw.headers["X-LeMoE-Route-Method"]) == ("eyes", "capability")
    assert raw.parse().output_text == "Hello from eyes-model"
    assert models_reached(fake_upstream) == ["eyes-model"]

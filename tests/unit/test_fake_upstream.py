"""The fake upstream is faithful: real ollama/openai clients accept it, and its knobs bite."""

from __future__ import annotations

import json
import time

import ollama
import openai
import pytest
import requests

from tests.fakes.fake_upstream import CREATED, FakeUpstream, reserve_closed_port


def _ndjson(url: str, body: dict) -> list[dict]:
    with requests.post(url, json=body, stream=True, timeout=5) as r:
        assert r.status_code == 200
        assert r.headers["Content-Type"] == "application/x-ndjson"
        raw = r.content.decode()
    assert raw.endswith("\n") and "\n\n" not in raw
    return [json.loads(line) for line in raw.splitlines()]


def _sse_data(url: str, body: dict) -> list[str]:
    with requests.post(url, json=body, stream=True, timeout=5) as r:
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = r.content.decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [e.removeprefix("data: ") for e in events]


# --- plain HTTP --------------------------------------------------------------------------------


def test_listing_endpoints_and_records(fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("coder", tokens=["x"])
    assert requests.get(f"{fake_upstream.url}/api/version", timeout=5).json() == {"version": "0.12.0"}
    tags = requests.get(f"{fake_upstream.url}/api/tags", timeout=5).json()["models"]
    assert {m["name"] for m in tags} == {"fake-model:latest", "coder:latest"}
    assert all(m["name"] == m["model"] for m in tags)
    ids = [m["id"] for m in requests.get(f"{fake_upstream.url}/v1/models", timeout=5).json()["data"]]
    assert sorted(ids) == ["coder:latest", "fake-model:latest"]
    assert [r.path for r in fake_upstream.requests] == ["/api/version", "/api/tags", "/v1/models"]


def test_ollama_chat_stream_lines(fake_upstream: FakeUpstream) -> None:
    lines = _ndjson(
        f"{fake_upstream.url}/api/chat",
        {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "options": {"temperature": 0.1}},
    )
    assert "".join(x["message"]["content"] for x in lines) == "Hello from m1"
    assert [x["done"] for x in lines] == [False, False, False, True]
    assert all(x["model"] == "m1" and x["message"]["role"] == "assistant" for x in lines)
    final = lines[-1]
    assert final["done_reason"] == "stop" and final["eval_count"] == 3 and final["prompt_eval_count"] == 5
    recorded = fake_upstream.last_request
    assert recorded.path == "/api/chat" and recorded.json["options"] == {"temperature": 0.1}
    assert recorded.headers["content-type"] == "application/json"


def test_openai_chat_stream_frames(fake_upstream: FakeUpstream) -> None:
    body = {"model": "m2", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    data = _sse_data(f"{fake_upstream.url}/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 8
    assert {c["id"] for c in chunks} == {"chatcmpl-fake"} and {c["created"] for c in chunks} == {CREATED}
    # Without include_usage there is no usage chunk.
    plain = _sse_data(f"{fake_upstream.url}/v1/chat/completions", body)
    assert all("usage" not in json.loads(d) for d in plain[:-1])


def test_ollama_generate_empty_prompt_is_a_load_probe(fake_upstream: FakeUpstream) -> None:
    r = requests.post(f"{fake_upstream.url}/api/generate", json={"model": "m", "keep_alive": 0}, timeout=5)
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.json()["done_reason"] == "unload"


# --- the real ollama client ----------------------------------------------------------------------


def test_ollama_client_chat(fake_upstream: FakeUpstream) -> None:
    client = ollama.Client(host=fake_upstream.url)
    whole = client.chat(model="m", messages=[{"role": "user", "content": "hi"}])
    assert whole.message.content == "Hello from m" and whole.eval_count == 3
    parts = list(client.chat(model="m", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "".join(p.message.content or "" for p in parts) == "Hello from m"
    assert parts[-1].done and parts[-1].done_reason == "stop"
    assert [r.json["stream"] for r in fake_upstream.requests_to("/api/chat")] == [False, True]


def test_ollama_client_generate_and_list(fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("gen", tokens=["a", "b"], thinking=["hmm"])
    client = ollama.Client(host=fake_upstream.url)
    assert client.generate(model="gen", prompt="p").response == "ab"
    parts = list(client.generate(model="gen", prompt="p", stream=True))
    assert [p.thinking for p in parts[:1]] == ["hmm"]
    assert "".join(p.response for p in parts) == "ab" and parts[-1].context == [1, 2, 3]
    assert "gen:latest" in [m.model for m in client.list().models]


def test_ollama_client_tool_call(fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("tools", tool_call=("get_weather", {"city": "Tokyo"}))
    client = ollama.Client(host=fake_upstream.url)
    for answer in (
        client.chat(model="tools", messages=[{"role": "user", "content": "w"}]),
        next(iter(client.chat(model="tools", messages=[{"role": "user", "content": "w"}], stream=True))),
    ):
        (call,) = answer.message.tool_calls or []
        assert call.function.name == "get_weather" and dict(call.function.arguments) == {"city": "Tokyo"}


def test_ollama_client_sees_errors(fake_upstream: FakeUpstream) -> None:
    client = ollama.Client(host=fake_upstream.url)
    fake_upstream.behave("sick", fail_status=503)
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="sick", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 503
    fake_upstream.behave("midway", stream_error="out of memory", stream_error_after=1)
    stream = client.chat(model="midway", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert next(iter(stream)).message.content == "Hello"
    with pytest.raises(ollama.ResponseError, match="out of memory"):
        list(stream)


# --- the real openai client ----------------------------------------------------------------------


def _openai(upstream: FakeUpstream, key: str = "x") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{upstream.url}/v1", api_key=key, max_retries=0, timeout=5)


def test_openai_client_chat(fake_upstream: FakeUpstream) -> None:
    client = _openai(fake_upstream)
    whole = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert whole.choices[0].message.content == "Hello from m" and whole.usage and whole.usage.total_tokens == 8
    chunks = list(
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from m"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert fake_upstream.last_request.headers["Authorization"] == "Bearer x"


def test_openai_client_streamed_tool_call(fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("tools", tool_call=("get_weather", {"city": "Tokyo", "unit": "C"}))
    client = _openai(fake_upstream)
    chunks = list(client.chat.completions.create(model="tools", messages=[{"role": "user", "content": "w"}], stream=True))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].id == "call_fake0" and calls[0].function and calls[0].function.name == "get_weather"
    arguments = "".join(tc.function.arguments or "" for tc in calls if tc.function)
    assert json.loads(arguments) == {"city": "Tokyo", "unit": "C"} and len(calls) > 2
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    whole = client.chat.completions.create(model="tools", messages=[{"role": "user", "content": "w"}])
    (call,) = whole.choices[0].message.tool_calls or []
    assert json.loads(call.function.arguments) == {"city": "Tokyo", "unit": "C"}  # type: ignore[union-attr]


def test_openai_client_completions(fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("c", tokens=["one", " two"], done_reason="length")
    client = _openai(fake_upstream)
    whole = client.completions.create(model="c", prompt="p")
    assert whole.choices[0].text == "one two" and whole.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="c", prompt="p", stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "one two"
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 5


def test_openai_client_sees_errors_and_key(fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("locked", require_key="sesame")
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError):
        _openai(fake_upstream, "wrong").chat.completions.create(model="locked", messages=messages)  # type: ignore[arg-type]
    ok = _openai(fake_upstream, "sesame").chat.completions.create(model="locked", messages=messages)  # type: ignore[arg-type]
    assert ok.choices[0].message.content == "Hello from locked"
    fake_upstream.behave("sick", fail_status=500)
    with pytest.raises(openai.InternalServerError):
        _openai(fake_upstream).chat.completions.create(model="sick", messages=messages)  # type: ignore[arg-type]
    fake_upstream.behave("midway", stream_error="boom", stream_error_after=2)
    stream = _openai(fake_upstream).chat.completions.create(model="midway", messages=messages, stream=True)  # type: ignore[arg-type]
    with pytest.raises(openai.APIError, match="boom"):
        list(stream)


# --- knobs that break the transport ---------------------------------------------------------------


def test_refuse_closes_without_an_answer(fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("gone", refuse=True)
    with pytest.raises(requests.ConnectionError):
        requests.post(f"{fake_upstream.url}/api/chat", json={"model": "gone", "messages": []}, timeout=5)


def test_drop_after_cuts_the_stream(fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("cut", drop_after=2)
    seen = []
    with requests.post(f"{fake_upstream.url}/api/chat", json={"model": "cut", "messages": []}, stream=True, timeout=5) as r:
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for line in r.iter_lines():
                seen.append(json.loads(line)["message"]["content"])
    assert seen == ["Hello", " from"]


def test_garbage_is_not_json(fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("junk", garbage=True)
    r = requests.post(f"{fake_upstream.url}/api/chat", json={"model": "junk", "messages": []}, timeout=5)
    assert r.status_code == 200
    with pytest.raises(ValueError):
        json.loads(r.text.splitlines()[0])


def test_delay_first_trips_a_short_read_timeout(fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("slow", delay_first=1.0)
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{fake_upstream.url}/api/chat", json={"model": "slow", "messages": []}, timeout=(2, 0.2))
    assert time.monotonic() - started < 0.9


def test_client_going_away_is_counted(fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("long", tokens=["a"] * 50, delay_between=0.05)
    with requests.post(f"{fake_upstream.url}/api/chat", json={"model": "long", "messages": []}, stream=True, timeout=5) as r:
        next(r.iter_lines())
    assert fake_upstream.wait_for_disconnects(1)


def test_unknown_knob_is_refused(fake_upstream: FakeUpstream) -> None:
    with pytest.raises(TypeError):
        fake_upstream.behave("m", dealy_first=1.0)


def test_reserved_closed_port_refuses() -> None:
    with reserve_closed_port() as port:
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/api/version", timeout=2)

"""Silent self-correction with the real server and the loopback stand-in failing on purpose."""

from __future__ import annotations

import json
import time

import pytest
import requests

from tests.contract.conftest import READ_TIMEOUT, LiveServer
from tests.fakes.fake_upstream import FakeUpstream

# Keep the real fallback model's answers short: these tests are about who answers, not what.
SHORT = {"num_predict": 12}


def ollama_chat(base_url: str, text: str, stream: bool) -> requests.Response:
    return requests.post(base_url + "/api/chat", json={
        "model": "lemoe", "messages": [{"role": "user", "content": text}], "stream": stream, "options": SHORT}, timeout=60)


def openai_chat(base_url: str, text: str, stream: bool) -> requests.Response:
    return requests.post(base_url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": text}], "stream": stream, "max_tokens": 12}, timeout=60)


def ndjson(r: requests.Response) -> list[dict]:
    return [json.loads(line) for line in r.content.decode().split("\n") if line]


def assert_normal_ollama_answer(r: requests.Response, stream: bool) -> str:
    assert r.status_code == 200
    if stream:
        lines = ndjson(r)
        assert not any("error" in line for line in lines)
        assert lines[-1]["done"] is True
        text = "".join(line["message"]["content"] for line in lines)
    else:
        text = r.json()["message"]["content"]
    assert text.strip()
    return text


def wait_for_log(server: LiveServer, needle: str, timeout: float = 5) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = server.log_text()
        if needle in text:
            return text
        time.sleep(0.05)
    return server.log_text()


@pytest.mark.parametrize("stream", [True, False])
def test_expert_whose_server_is_down_is_replaced_by_fallback(lemoe_server: LiveServer, stream: bool) -> None:
    r = ollama_chat(lemoe_server.url, "my kubernetes pods keep restarting", stream)
    text = assert_normal_ollama_answer(r, stream)
    assert "Hello from" not in text
    assert r.headers["X-LeMoE-Expert"] == "fallback"
    assert "[Auto-Correction] expert 'broken'" in wait_for_log(lemoe_server, "[Auto-Correction] expert 'broken'")


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("knobs", [{"fail_status": 500}, {"fail_status": 503}, {"refuse": True}, {"garbage": True},
                                   {"stream_error": "model crashed", "stream_error_after": 0}])
def test_failure_before_first_token_falls_back(lemoe_server: LiveServer, fake_upstream: FakeUpstream,
                                              knobs: dict, stream: bool) -> None:
    fake_upstream.behave("flaky-model", **knobs)
    r = ollama_chat(lemoe_server.url, "what is the weather forecast", stream)
    text = assert_normal_ollama_answer(r, stream)
    assert "Hello from flaky-model" not in text
    assert r.headers["X-LeMoE-Expert"] == "fallback"


@pytest.mark.parametrize("stream", [True, False])
def test_openai_upstream_failure_falls_back_for_openai_clients(lemoe_server: LiveServer, fake_upstream: FakeUpstream,
                                                              stream: bool) -> None:
    fake_upstream.behave("flakyai-model", fail_status=500)
    r = openai_chat(lemoe_server.url, "a cooking recipe for bread", stream)
    assert r.status_code == 200 and r.headers["X-LeMoE-Expert"] == "fallback"
    if stream:
        events = r.content.decode().split("\n\n")
        assert events[-2] == "data: [DONE]"
        assert not any('"error"' in e for e in events)
    else:
        assert r.json()["choices"][0]["message"]["content"].strip()


def test_timeout_before_first_token_falls_back(lemoe_server: LiveServer, fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("flaky-model", delay_first=READ_TIMEOUT + 2)
    started = time.monotonic()
    r = ollama_chat(lemoe_server.url, "weather tomorrow?", False)
    assert_normal_ollama_answer(r, False)
    assert r.headers["X-LeMoE-Expert"] == "fallback"
    assert time.monotonic() - started < READ_TIMEOUT + 30


def test_drop_mid_stream_ends_ollama_stream_with_error_line(lemoe_server: LiveServer, fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("flaky-model", tokens=["a", "b", "c", "d", "e"], drop_after=2)
    r = ollama_chat(lemoe_server.url, "weather report", True)
    assert r.status_code == 200
    lines = ndjson(r)
    assert [line["message"]["content"] for line in lines[:-1]] == ["a", "b"]
    assert set(lines[-1]) == {"error"} and "flaky" not in lines[-1]["error"]
    assert requests.get(lemoe_server.url + "/api/tags").status_code == 200


def test_drop_mid_stream_ends_sse_with_error_event(lemoe_server: LiveServer, fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("flakyai-model", tokens=["a", "b", "c", "d"], drop_after=2)
    r = openai_chat(lemoe_server.url, "cooking dinner", True)
    events = [e for e in r.content.decode().split("\n\n") if e]
    last = json.loads(events[-1][len("data: "):])
    assert set(last) == {"error"} and last["error"]["message"]


def test_drop_mid_answer_without_streaming_reruns_on_fallback(lemoe_server: LiveServer, fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("flaky-model", tokens=["a", "b", "c", "d", "e"], drop_after=2)
    r = ollama_chat(lemoe_server.url, "weather report", False)
    assert_normal_ollama_answer(r, False)
    assert r.headers["X-LeMoE-Expert"] == "fallback"


def test_slow_stream_does_not_block_other_requests(lemoe_server: LiveServer, fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("flaky-model", tokens=["x"] * 6, delay_between=0.4)
    with requests.post(lemoe_server.url + "/api/chat", json={
            "model": "flaky", "messages": [{"role": "user", "content": "hi"}]}, stream=True, timeout=30) as slow:
        first = next(slow.iter_lines())
        assert json.loads(first)["message"]["content"] == "x"
        started = time.monotonic()
        quick = requests.get(lemoe_server.url + "/api/tags", timeout=5)
        assert quick.status_code == 200
        assert time.monotonic() - started < 1.5

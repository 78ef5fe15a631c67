"""Fault injection with the loopback stand-in: what each kind of client sees when an expert is
down, refuses, times out, fails before its first token, drops mid-stream or talks garbage; the
fallback failing too; experts benched after repeated failures; clients that go away.

The fallback expert here is remote (`fallback-model` on the fake), so its answer is known
exactly: "Hello from fallback-model". tests/contract/test_fallback.py covers the same failures
with the real GGUF fallback on Ollama's chat route; these cover all four inference routes, both
answer modes, and what happens after.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest
import requests

from tests.fakes.fake_upstream import FakeUpstream
from tests.hardening.conftest import StartLemoe
from tests.hardening.test_hostile_requests import assert_no_leak, expected_error
from tests.live_server import LiveServer

FALLBACK_TEXT = "Hello from fallback-model"
# Route -> (body builder, which upstream model the text routes to).
ROUTES = {
    "/api/chat": lambda text, stream: {"model": "lemoe", "messages": [{"role": "user", "content": text}],
                                       "stream": stream},
    "/api/generate": lambda text, stream: {"model": "lemoe", "prompt": text, "stream": stream},
    "/v1/chat/completions": lambda text, stream: {"messages": [{"role": "user", "content": text}], "stream": stream},
    "/v1/completions": lambda text, stream: {"prompt": text, "stream": stream},
}
# An Ollama-type expert (flaky) and an OpenAI-type one (flakyai), reached by their keywords.
UPSTREAMS = {"flaky-model": "what is the weather forecast", "flakyai-model": "a cooking recipe"}
FAULTS: dict[str, dict[str, Any]] = {
    "http-500": {"fail_status": 500},
    "http-503": {"fail_status": 503},
    "http-404-model-gone": {"fail_status": 404},
    "refuses-connection": {"refuse": True},
    "times-out-before-answer": {"delay_first": 1.6},
    "error-before-first-token": {"stream_error": "model crashed", "stream_error_after": 0},
    "garbage": {"garbage": True},
    "drops-before-first-token": {"drop_after": 0},
    "error-body-not-json": {"fail_status": 500, "fail_body": "<html>Bad Gateway</html>"},
}


def post(server: LiveServer, route: str, text: str, stream: bool, timeout: float = 30) -> requests.Response:
    return requests.post(server.url + route, json=ROUTES[route](text, stream), timeout=timeout)


def answer_text(route: str, r: requests.Response, stream: bool) -> str:
    """The answer's text, after checking it is a complete, error-free answer in the protocol."""
    assert r.status_code == 200, r.text[:300]
    body = r.content.decode()
    assert_no_leak(body)
    if route.startswith("/api/"):
        field = "message" if route == "/api/chat" else "response"
        lines = [json.loads(line) for line in body.splitlines() if line] if stream else [r.json()]
        assert not any("error" in line for line in lines) and lines[-1]["done"] is True
        return "".join(line[field]["content"] if field == "message" else line[field] for line in lines)
    if not stream:
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        return choice["message"]["content"] if route == "/v1/chat/completions" else choice["text"]
    events = [e for e in body.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert not any("error" in c for c in chunks)
    key = "delta" if route == "/v1/chat/completions" else None
    return "".join((c["choices"][0][key].get("content") or "") if key else c["choices"][0]["text"]
                   for c in chunks if c["choices"])


def assert_still_serving(server: LiveServer) -> None:
    assert requests.get(server.url + "/api/tags", timeout=5).status_code == 200
    r = post(server, "/api/chat", "write a python function", False)
    assert r.json()["message"]["content"] == "Hello from coder-model"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_before_first_token_gets_the_fallback_answer(open_server: LiveServer, fake_upstream: FakeUpstream,
                                                         fault: str, route: str, stream: bool) -> None:
    model = "flakyai-model" if route.startswith("/v1/") else "flaky-model"
    fake_upstream.behave(model, **FAULTS[fault])
    r = post(open_server, route, UPSTREAMS[model], stream)
    assert answer_text(route, r, stream) == FALLBACK_TEXT
    assert r.headers["X-LeMoE-Expert"] == "fallback"


@pytest.mark.parametrize("route", list(ROUTES))
def test_expert_down_falls_back_on_every_route(open_server: LiveServer, route: str) -> None:
    for stream in (False, True):
        r = post(open_server, route, "my docker containers keep restarting", stream)
        assert answer_text(route, r, stream) == FALLBACK_TEXT


@pytest.mark.parametrize("route", ["/api/chat", "/api/generate"])
def test_drop_mid_stream_ends_ndjson_with_an_error_line(open_server: LiveServer, fake_upstream: FakeUpstream,
                                                       route: str) -> None:
    fake_upstream.behave("flaky-model", tokens=["a", "b", "c", "d"], drop_after=2)
    r = post(open_server, route, "weather", True)
    assert r.status_code == 200 and r.headers["X-LeMoE-Expert"] == "flaky"
    lines = [json.loads(line) for line in r.content.decode().splitlines()]
    field = "message" if route == "/api/chat" else "response"
    assert [line[field]["content"] if field == "message" else line[field] for line in lines[:-1]] == ["a", "b"]
    assert lines[-1] == {"error": "the model failed while generating the answer"}
    assert_still_serving(open_server)


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_drop_mid_stream_ends_sse_with_an_error_event(open_server: LiveServer, fake_upstream: FakeUpstream,
                                                     route: str) -> None:
    fake_upstream.behave("flakyai-model", tokens=["a", "b", "c", "d"], drop_after=2)
    r = post(open_server, route, "cooking", True)
    events = [e for e in r.content.decode().split("\n\n") if e]
    assert json.loads(events[-1][len("data: "):]) == {"error": {
        "message": "The model failed while generating the response; the answer is incomplete.",
        "type": "api_error", "param": None, "code": None}}
    assert_still_serving(open_server)


@pytest.mark.parametrize("route", list(ROUTES))
def test_drop_mid_answer_without_streaming_is_rerun_on_the_fallback(open_server: LiveServer,
                                                                  fake_upstream: FakeUpstream, route: str) -> None:
    model = "flakyai-model" if route.startswith("/v1/") else "flaky-model"
    fake_upstream.behave(model, tokens=["a", "b", "c", "d"], drop_after=2)
    r = post(open_server, route, UPSTREAMS[model], False)
    assert answer_text(route, r, False) == FALLBACK_TEXT


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("route", list(ROUTES))
def test_fallback_failing_too_gives_503_in_protocol(open_server: LiveServer, fake_upstream: FakeUpstream,
                                                    route: str, stream: bool) -> None:
    fake_upstream.behave("fallback-model", fail_status=500)
    fake_upstream.behave("flaky-model", refuse=True)
    fake_upstream.behave("flakyai-model", garbage=True)
    text = "weather" if route.startswith("/api/") else "cooking"
    started = time.monotonic()
    r = post(open_server, route, text, stream)
    assert time.monotonic() - started < 10
    assert r.status_code == 503
    assert r.headers["Retry-After"] == "5"
    assert r.json() == expected_error(route, 503, "no expert is available to answer right now")
    fake_upstream.reset()
    assert_still_serving(open_server)


def test_slow_expert_times_out_on_its_own_timeout(open_server: LiveServer, fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("flaky-model", delay_first=5)
    started = time.monotonic()
    r = post(open_server, "/api/chat", "weather", False)
    assert r.json()["message"]["content"] == FALLBACK_TEXT
    assert time.monotonic() - started < 3.5, "flaky's own 1s timeout, not the 2s server default, applies"


def test_stalled_stream_after_first_token_ends_cleanly(open_server: LiveServer, fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("flaky-model", tokens=["a", "b"], delay_between=4)
    r = post(open_server, "/api/chat", "weather", True)
    lines = [json.loads(line) for line in r.content.decode().splitlines()]
    assert lines[0]["message"]["content"] == "a"
    assert lines[-1] == {"error": "the model failed while generating the answer"}


def test_many_faulty_requests_at_once_leave_the_server_serving(open_server: LiveServer,
                                                             fake_upstream: FakeUpstream) -> None:
    from concurrent.futures import ThreadPoolExecutor

    fake_upstream.behave("flaky-model", refuse=True)
    fake_upstream.behave("flakyai-model", garbage=True)
    jobs = [(route, UPSTREAMS["flakyai-model" if route.startswith("/v1/") else "flaky-model"], i % 2 == 0)
            for i, route in enumerate(list(ROUTES) * 6)]
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda job: answer_text(job[0], post(open_server, *job), job[2]), jobs))
    assert texts == [FALLBACK_TEXT] * len(jobs)
    assert_still_serving(open_server)


# --- a client that goes away mid-stream stops the expert ------------------------------------------

def read_first_line_then_hang_up(server: LiveServer, route: str, text: str) -> bytes:
    body = json.dumps(ROUTES[route](text, True)).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST {route} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while b"Hello" not in received and b'"a"' not in received:
            chunk = sock.recv(4096)
            assert chunk, "the server closed before the first token"
            received += chunk
    return received


@pytest.mark.parametrize("route", list(ROUTES))
def test_client_hanging_up_mid_stream_stops_the_expert(open_server: LiveServer, fake_upstream: FakeUpstream,
                                                      route: str) -> None:
    model = "flakyai-model" if route.startswith("/v1/") else "flaky-model"
    fake_upstream.behave(model, tokens=["a"] + ["x"] * 40, delay_between=0.1)
    started = time.monotonic()
    read_first_line_then_hang_up(open_server, route, UPSTREAMS[model])
    assert fake_upstream.wait_for_disconnects(1, timeout=3.5), "the upstream stream was not abandoned"
    assert time.monotonic() - started < 3.5, "stopped well before the 4s the full answer would take"
    assert_still_serving(open_server)


# --- cool-down ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def benching_server(start_lemoe: StartLemoe) -> LiveServer:
    return start_lemoe({"server": {"expert_failures_before_cooldown": 2, "expert_cooldown_seconds": 1.5}})


def test_failing_expert_is_benched_then_tried_again(benching_server: LiveServer, fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("flaky-model", fail_status=500)
    for _ in range(2):
        assert post(benching_server, "/api/chat", "weather", False).json()["message"]["content"] == FALLBACK_TEXT
    tried = len(fake_upstream.requests_to("/api/chat"))
    started = time.monotonic()
    for stream in (False, True, False):
        r = post(benching_server, "/api/chat", "weather", stream)
        assert answer_text("/api/chat", r, stream) == FALLBACK_TEXT and r.headers["X-LeMoE-Expert"] == "fallback"
    flaky_calls = [q for q in fake_upstream.requests_to("/api/chat")[tried:] if q.json["model"] == "flaky-model"]
    assert flaky_calls == [], "a benched expert must not be asked"
    assert time.monotonic() - started < 1.0, "benched requests skip straight to the fallback"
    log = benching_server.log_text()
    assert "expert 'flaky' benched for 1.5s after 2 failures in a row" in log
    assert "[Auto-Correction] expert 'flaky' is in cool-down; answering with fallback 'fallback'" in log

    fake_upstream.reset()
    time.sleep(1.6)
    r = post(benching_server, "/api/chat", "weather", False)
    assert r.json()["message"]["content"] == "Hello from flaky-model" and r.headers["X-LeMoE-Expert"] == "flaky"
    log = benching_server.log_text()
    assert "expert 'flaky' cool-down is over" in log and "expert 'flaky' recovered" in log


def test_benching_one_expert_leaves_the_others_alone(benching_server: LiveServer, fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("flakyai-model", refuse=True)
    for _ in range(3):
        post(benching_server, "/v1/chat/completions", "cooking", False)
    r = post(benching_server, "/v1/chat/completions", "write a short poem", False)
    assert r.json()["choices"][0]["message"]["content"] == "Hello from writer-model"

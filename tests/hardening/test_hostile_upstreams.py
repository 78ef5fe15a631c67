"""Hostile upstreams against a live server: one line of 10 MB, an answer that never ends, an
answer sent one byte a second. Each gets a well-formed answer or the protocol's error, and
other clients of the same worker are served meanwhile.

Every expert is asked for by name, so each test picks its upstream behaviour by model name:
`<kind>` speaks Ollama and `<kind>ai` OpenAI to the same fake model `<kind>-model`.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from tests.fakes.fake_upstream import FakeUpstream
from tests.hardening.conftest import StartLemoe, remote_expert
from tests.hardening.test_hostile_requests import assert_no_leak
from tests.live_server import LiveServer

FALLBACK_TEXT = "Hello from fallback-model"
TEN_MB = 10_000_000
# Small enough that an endless answer reaches it within a second on the fake.
LINE_LIMIT = 256 * 1024
ANSWER_LIMIT = 512 * 1024
# Generous: the old reader spent minutes on a 10 MB line; a bounded one answers in milliseconds.
TIMEOUT = 10
KINDS = ("longline", "endless", "trickle")
NDJSON_ERROR = {"error": "the model failed while generating the answer"}
SSE_ERROR = {"error": {"message": "The model failed while generating the response; the answer is incomplete.",
                       "type": "api_error", "param": None, "code": None}}


@pytest.fixture(scope="module")
def hostile_server(start_lemoe: StartLemoe, fake_upstream: FakeUpstream) -> LiveServer:
    experts: list[dict[str, Any]] = [remote_expert(0, "fallback", "ollama", "fallback-model", [], fake_upstream.url)]
    for i, kind in enumerate(KINDS):
        experts.append(remote_expert(2 * i + 1, kind, "ollama", f"{kind}-model", [kind], fake_upstream.url))
        experts.append(remote_expert(2 * i + 2, f"{kind}ai", "openai", f"{kind}-model", [f"{kind}ai"],
                                     fake_upstream.url))
    # Room for the hostile answers of the in-flight test next to the probes.
    return start_lemoe({"server": {"threads": 64, "max_upstream_line_bytes": LINE_LIMIT,
                                   "max_upstream_answer_bytes": ANSWER_LIMIT}}, experts=experts)


def chat(server: LiveServer, route: str, expert: str, stream: bool, timeout: float = TIMEOUT) -> requests.Response:
    body = {"model": expert, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return requests.post(server.url + route, json=body, timeout=timeout)


def answer(route: str, r: requests.Response, stream: bool) -> tuple[list[str], Any]:
    """The text pieces of an answer and its last line or event (the end marker or the error)."""
    assert r.status_code == 200, r.text[:300]
    text = r.content.decode()
    assert_no_leak(text)
    if route == "/api/chat":
        lines = [json.loads(line) for line in text.splitlines() if line] if stream else [r.json()]
        return [line["message"]["content"] for line in lines if "message" in line], lines[-1]
    if not stream:
        body = r.json()
        return [body["choices"][0]["message"]["content"]], body
    events = [e[len("data: "):] for e in text.split("\n\n") if e]
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    pieces = [c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")]
    return [p for p in pieces if p], events[-1] if events[-1] == "[DONE]" else json.loads(events[-1])


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("route", ["/api/chat", "/v1/chat/completions"])
@pytest.mark.parametrize("expert", ["longline", "longlineai"])
def test_a_10_mb_line_before_the_first_token_gets_the_fallback_answer(
    hostile_server: LiveServer, fake_upstream: FakeUpstream, expert: str, route: str, stream: bool
) -> None:
    fake_upstream.behave("longline-model", long_line=TEN_MB)
    r = chat(hostile_server, route, expert, stream)
    pieces, _ = answer(route, r, stream)
    assert "".join(pieces) == FALLBACK_TEXT
    assert r.headers["X-LeMoE-Expert"] == "fallback"
    assert f"[Auto-Correction] expert '{expert}' failed (ExpertAnswerTooLarge:" in hostile_server.log_text()


@pytest.mark.parametrize("route", ["/api/chat", "/v1/chat/completions"])
@pytest.mark.parametrize("expert", ["longline", "longlineai"])
def test_a_10_mb_line_after_the_first_token_ends_the_stream_with_the_protocol_error(
    hostile_server: LiveServer, fake_upstream: FakeUpstream, expert: str, route: str
) -> None:
    fake_upstream.behave("longline-model", tokens=["first", "second"], long_line=TEN_MB, hostile_after=1)
    r = chat(hostile_server, route, expert, True)
    pieces, last = answer(route, r, True)
    assert pieces == ["first"]
    assert last == (NDJSON_ERROR if route == "/api/chat" else SSE_ERROR)
    assert r.headers["X-LeMoE-Expert"] == expert


@pytest.mark.parametrize("route", ["/api/chat", "/v1/chat/completions"])
@pytest.mark.parametrize("expert", ["endless", "endlessai"])
def test_an_endless_answer_is_cut_at_the_answer_limit(hostile_server: LiveServer, fake_upstream: FakeUpstream,
                                                     expert: str, route: str) -> None:
    fake_upstream.behave("endless-model", tokens=["more "], endless=True)
    r = chat(hostile_server, route, expert, True)
    pieces, last = answer(route, r, True)
    assert len(pieces) > 1000 and set(pieces) == {"more "}
    assert last == (NDJSON_ERROR if route == "/api/chat" else SSE_ERROR)
    # Without streaming the whole answer is collected first, so it is re-run on the fallback.
    r = chat(hostile_server, route, expert, False)
    assert answer(route, r, False)[0] == [FALLBACK_TEXT]
    assert f"answer longer than {ANSWER_LIMIT} bytes" in hostile_server.log_text()


def _raw_chat(url: str, route: str, expert: str) -> socket.socket:
    """A streamed chat request whose answer nobody reads: it stays in flight until closed."""
    parts = urlsplit(url)
    body = json.dumps({"model": expert, "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    sock = socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT)
    sock.sendall(f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


class _Repeat:
    """Sends the same hostile request again and again from a thread until stopped."""

    def __init__(self, server: LiveServer, route: str, expert: str) -> None:
        self.started = 0
        self.done = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(server, route, expert), daemon=True)
        self._thread.start()

    def _run(self, server: LiveServer, route: str, expert: str) -> None:
        while not self._stop.is_set():
            self.started += 1
            try:
                r = chat(server, route, expert, True, timeout=30)
                if r.status_code != 200:
                    self.failures.append(f"{expert}: {r.status_code}")
            except requests.RequestException as exc:
                self.failures.append(f"{expert}: {type(exc).__name__}")
            self.done += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


@pytest.fixture
def hostile_answers_in_flight(hostile_server: LiveServer, fake_upstream: FakeUpstream) -> Iterator[list[_Repeat]]:
    """Eight hostile answers at any moment: three 10 MB lines, three endless answers (both
    repeated as soon as they end) and two answers trickling one byte a second."""
    fake_upstream.behave("longline-model", long_line=TEN_MB)
    fake_upstream.behave("endless-model", tokens=["more "], endless=True)
    fake_upstream.behave("trickle-model", trickle=1.0)
    trickles = [_raw_chat(hostile_server.url, "/api/chat", "trickle"),
                _raw_chat(hostile_server.url, "/v1/chat/completions", "trickleai")]
    repeats = [_Repeat(hostile_server, route, expert)
               for route, expert in (("/api/chat", "longline"), ("/v1/chat/completions", "longlineai"),
                                     ("/api/chat", "longlineai"), ("/api/chat", "endless"),
                                     ("/v1/chat/completions", "endlessai"), ("/v1/chat/completions", "endless"))]
    time.sleep(0.5)
    try:
        yield repeats
    finally:
        for repeat in repeats:
            repeat.stop()
        for sock in trickles:
            sock.close()


def test_other_clients_are_served_while_hostile_answers_are_in_flight(
    hostile_server: LiveServer, hostile_answers_in_flight: list[_Repeat]
) -> None:
    # Every probe must answer within the timeout (no timing is asserted beyond that bound).
    for _ in range(20):
        r = requests.get(hostile_server.url + "/api/version", timeout=5)
        assert r.status_code == 200 and "version" in r.json()
        time.sleep(0.05)
    r = chat(hostile_server, "/api/chat", "fallback", False, timeout=5)
    assert answer("/api/chat", r, False)[0] == [FALLBACK_TEXT]
    repeats = hostile_answers_in_flight
    for repeat in repeats:
        repeat.stop()
    # They were in flight all along, and each got a well-formed answer (fallback or error end).
    assert all(repeat.done > 0 for repeat in repeats), [repeat.done for repeat in repeats]
    assert not any(repeat.failures for repeat in repeats), [repeat.failures for repeat in repeats]

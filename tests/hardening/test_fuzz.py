"""Property-based fuzzing of both APIs on a live server (hypothesis): whatever the body, path or
headers, the server answers without a 5xx, in the route's protocol, and never with a traceback or
an internal path."""

from __future__ import annotations

import json
from typing import Any

import requests
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.hardening.conftest import call_from
from tests.hardening.test_hostile_requests import ANTHROPIC_TYPES, OPENAI_TYPES, assert_no_leak
from tests.live_server import LiveServer

FUZZ = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(max_size=30))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Nine times in ten a value of the right shape, else any JSON value: deep enough to reach
    routing and generation, hostile enough to hit every validator."""
    return st.integers(0, 9).flatmap(lambda n: json_values if n == 0 else valid)


short_text = st.text(max_size=60)
roles = st.sampled_from(["system", "user", "assistant", "tool", "developer"])
message = st.fixed_dictionaries({"role": mostly(roles), "content": mostly(short_text)}, optional={
    "images": mostly(st.just([])), "tool_calls": mostly(st.just([])), "tool_call_id": mostly(short_text),
    "name": mostly(short_text)})
messages = mostly(st.lists(message, min_size=1, max_size=3))
options = mostly(st.fixed_dictionaries({}, optional={
    "temperature": mostly(st.floats(0, 2)), "top_p": mostly(st.floats(0, 1)), "top_k": mostly(st.integers(1, 50)),
    "num_predict": mostly(st.integers(1, 20)), "seed": mostly(st.integers(0, 2**31)),
    "stop": mostly(st.lists(short_text, max_size=2)), "num_ctx": mostly(st.integers(128, 4096))}))
# Models that exist, the router's name, and junk: answers come from the fake upstream either way.
models = mostly(st.sampled_from(["lemoe", "coder", "coder:latest", "writer", "fallback", "nope", "", "LEMOE"]))
stream = mostly(st.booleans())
text_block = st.fixed_dictionaries({"type": mostly(st.just("text")), "text": mostly(short_text)})
anthropic_message = st.fixed_dictionaries({"role": mostly(st.sampled_from(["user", "assistant"])),
                                           "content": mostly(short_text | st.lists(text_block, max_size=2))})
input_text = st.fixed_dictionaries({"type": mostly(st.just("input_text")), "text": mostly(short_text)})
responses_item = st.fixed_dictionaries({"role": mostly(roles),
                                        "content": mostly(short_text | st.lists(input_text, max_size=2))})


def body_for(route: str) -> st.SearchStrategy[dict[str, Any]]:
    ollama_common = {"model": models, "stream": stream, "options": options,
                     "format": mostly(st.sampled_from(["json", {"type": "object"}])),
                     "keep_alive": mostly(st.sampled_from(["5m", 0, -1, "1h"])), "think": mostly(st.booleans())}
    openai_common = {"model": models, "stream": stream, "temperature": mostly(st.floats(0, 2)),
                     "top_p": mostly(st.floats(0, 1)), "max_tokens": mostly(st.integers(1, 20)),
                     "stop": mostly(short_text | st.lists(short_text, max_size=2)),
                     "seed": mostly(st.integers(0, 2**31)),
                     "stream_options": mostly(st.fixed_dictionaries({"include_usage": st.booleans()})),
                     "n": mostly(st.just(1)), "user": mostly(short_text)}
    required = {"/api/chat": ("model", "messages"), "/api/generate": ("model", "prompt"), "/api/show": ("model",),
                "/v1/chat/completions": ("messages",), "/v1/completions": ("prompt",), "/v1/route": ("messages",),
                "/api/embed": ("model",), "/api/embeddings": ("model",), "/v1/embeddings": ("input",),
                "/v1/messages": ("messages", "max_tokens"), "/v1/responses": ("input",)}
    texts = short_text | st.lists(short_text, max_size=3)
    tokens = st.lists(st.integers(-1, 50_000), min_size=1, max_size=4)
    fields = {
        "/api/chat": {**ollama_common, "messages": messages, "tools": mostly(st.just([]))},
        "/api/generate": {**ollama_common, "prompt": mostly(short_text), "system": mostly(short_text),
                          "suffix": mostly(short_text), "raw": mostly(st.booleans()),
                          "context": mostly(st.lists(st.integers(0, 100), max_size=3))},
        "/api/show": {"model": models, "name": models, "verbose": mostly(st.booleans())},
        "/v1/chat/completions": {**openai_common, "messages": messages, "tools": mostly(st.just([])),
                                 "tool_choice": mostly(st.sampled_from(["auto", "none"])),
                                 "response_format": mostly(st.sampled_from([{"type": "text"},
                                                                            {"type": "json_object"}])),
                                 "reasoning_effort": mostly(st.sampled_from(["low", "medium", "high", "none"])),
                                 "max_completion_tokens": mostly(st.integers(1, 20))},
        "/v1/completions": {**openai_common,
                            "prompt": mostly(short_text | st.lists(short_text, min_size=1, max_size=1)),
                            "suffix": mostly(short_text)},
        "/v1/route": {"messages": messages, "model": models},
        "/api/embed": {"model": models, "input": mostly(texts | json_values), "truncate": mostly(st.booleans()),
                       "dimensions": mostly(st.integers(-2, 600)), "keep_alive": mostly(st.sampled_from(["5m", 0])),
                       "options": mostly(st.just({"num_ctx": 512}) | json_values)},
        "/api/embeddings": {"model": models, "prompt": mostly(short_text | json_values),
                            "options": mostly(st.just({}))},
        "/v1/embeddings": {"model": models, "input": texts | tokens | st.lists(tokens, max_size=2) | json_values,
                           "encoding_format": mostly(st.sampled_from(["float", "base64", "FLOAT", "hex"])),
                           "dimensions": mostly(st.integers(-2, 600)), "user": mostly(short_text)},
        "/v1/messages": {"model": models, "stream": stream, "max_tokens": mostly(st.integers(1, 20)),
                         "messages": mostly(st.lists(anthropic_message, min_size=1, max_size=3)),
                         "system": mostly(short_text | st.lists(st.fixed_dictionaries(
                             {"type": st.just("text"), "text": short_text}), max_size=2)),
                         "temperature": mostly(st.floats(0, 1)), "top_p": mostly(st.floats(0, 1)),
                         "top_k": mostly(st.integers(0, 50)), "stop_sequences": mostly(st.lists(short_text, max_size=2)),
                         "tools": mostly(st.just([])), "tool_choice": mostly(st.sampled_from([{"type": "auto"},
                                                                                             {"type": "none"}])),
                         "thinking": mostly(st.sampled_from([{"type": "disabled"},
                                                             {"type": "enabled", "budget_tokens": 1024}]))},
        "/v1/responses": {"model": models, "stream": stream, "instructions": mostly(short_text),
                          "input": mostly(short_text | st.lists(responses_item, min_size=1, max_size=3)),
                          "max_output_tokens": mostly(st.integers(1, 20)), "temperature": mostly(st.floats(0, 2)),
                          "top_p": mostly(st.floats(0, 1)), "tools": mostly(st.just([])),
                          "text": mostly(st.just({"format": {"type": "text"}})),
                          "reasoning": mostly(st.sampled_from([{"effort": "low"}, {"effort": "none"}]))},
    }[route]
    extra = st.dictionaries(st.text(max_size=10), json_values, max_size=2)
    present = {name: fields.pop(name) for name in required[route]}
    return st.tuples(st.fixed_dictionaries(present, optional=fields), extra).map(lambda pair: {**pair[1], **pair[0]})


def assert_well_formed(route: str, r: requests.Response) -> None:
    text = r.content.decode("utf-8")
    event(f"status {r.status_code}")
    assert r.status_code < 500, text[:500]
    assert_no_leak(text)
    if r.status_code != 200:
        body = r.json()
        if route == "/v1/messages" or route.startswith("/v1/messages/"):
            assert set(body) == {"type", "error"} and set(body["error"]) == {"type", "message"}
            assert body["error"]["type"] == ANTHROPIC_TYPES[r.status_code] and body["error"]["message"]
        elif route.startswith("/v1"):
            assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
            assert body["error"]["type"] == OPENAI_TYPES[r.status_code] and body["error"]["message"]
        else:
            assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
        return
    kind = r.headers["Content-Type"]
    if kind.startswith("application/x-ndjson"):
        lines = [json.loads(line) for line in text.splitlines() if line]
        assert lines and (lines[-1].get("done") is True or set(lines[-1]) == {"error"})
    elif kind.startswith("text/event-stream") and route in ("/v1/messages", "/v1/responses"):
        # Named events: `event: <type>` then `data: {"type": "<type>", ...}`.
        events = [e.split("\n") for e in text.split("\n\n") if e]
        names = [head.removeprefix("event: ") for head, _ in events]
        assert all(json.loads(data.removeprefix("data: "))["type"] == name for name, (_, data) in zip(names, events))
        assert names[-1] in ("message_stop", "error", "response.completed", "response.incomplete", "response.failed")
    elif kind.startswith("text/event-stream"):
        events = [e for e in text.split("\n\n") if e]
        assert events and all(e.startswith("data: ") for e in events)
        assert events[-1] == "data: [DONE]" or "error" in json.loads(events[-1][len("data: "):])
    else:
        assert isinstance(r.json(), dict)


def send(server: LiveServer, method: str, path: str, **kwargs: Any) -> requests.Response:
    return requests.request(method, server.url + path, timeout=30, **kwargs)


@FUZZ
@given(body=body_for("/api/chat"))
def test_fuzz_ollama_chat(open_server: LiveServer, body: dict[str, Any]) -> None:
    assert_well_formed("/api/chat", send(open_server, "POST", "/api/chat", json=body))


@FUZZ
@given(body=body_for("/api/generate"))
def test_fuzz_ollama_generate(open_server: LiveServer, body: dict[str, Any]) -> None:
    assert_well_formed("/api/generate", send(open_server, "POST", "/api/generate", json=body))


@FUZZ
@given(body=body_for("/api/show"))
def test_fuzz_ollama_show(open_server: LiveServer, body: dict[str, Any]) -> None:
    assert_well_formed("/api/show", send(open_server, "POST", "/api/show", json=body))


@FUZZ
@given(body=body_for("/v1/chat/completions"))
def test_fuzz_openai_chat(open_server: LiveServer, body: dict[str, Any]) -> None:
    assert_well_formed("/v1/chat/completions", send(open_server, "POST", "/v1/chat/completions", json=body))


@FUZZ
@given(body=body_for("/v1/completions"))
def test_fuzz_openai_completions(open_server: LiveServer, body: dict[str, Any]) -> None:
    assert_well_formed("/v1/completions", send(open_server, "POST", "/v1/completions", json=body))


@FUZZ
@given(body=body_for("/v1/route"))
def test_fuzz_route_dry_run(open_server: LiveServer, body: dict[str, Any]) -> None:
    assert_well_formed("/v1/route", send(open_server, "POST", "/v1/route", json=body))


@FUZZ
@given(route=st.sampled_from(["/api/embed", "/api/embeddings", "/v1/embeddings"]), data=st.data())
def test_fuzz_embeddings(open_server: LiveServer, route: str, data: st.DataObject) -> None:
    body = data.draw(body_for(route))
    assert_well_formed(route, send(open_server, "POST", route, json=body))


@FUZZ
@given(route=st.sampled_from(["/v1/messages", "/v1/responses"]), data=st.data())
def test_fuzz_anthropic_and_responses(open_server: LiveServer, route: str, data: st.DataObject) -> None:
    body = data.draw(body_for(route))
    assert_well_formed(route, send(open_server, "POST", route, json=body))


@FUZZ
@given(route=st.sampled_from(["/api/chat", "/api/generate", "/api/show", "/v1/chat/completions",
                              "/v1/completions", "/v1/route", "/api/embed", "/api/embeddings",
                              "/v1/embeddings", "/v1/messages", "/v1/messages/count_tokens", "/v1/responses"]),
       raw=st.binary(max_size=300))
def test_fuzz_raw_bytes(open_server: LiveServer, route: str, raw: bytes) -> None:
    assert_well_formed(route, send(open_server, "POST", route, data=raw))


@FUZZ
@given(prefix=st.sampled_from(["/", "/api/", "/v1/", "/v1/models/", "/v1/messages/", "/v1/responses/"]),
       rest=st.text(st.characters(codec="utf-8", exclude_characters="?#"), max_size=40),
       method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]))
def test_fuzz_paths_and_methods(open_server: LiveServer, prefix: str, rest: str, method: str) -> None:
    from urllib.parse import quote

    path = prefix + quote(rest, safe="/")
    r = send(open_server, method, path, data=b"{}" if method in ("POST", "PUT", "PATCH") else None)
    assert r.status_code < 500
    if method != "HEAD" and r.status_code != 200:
        assert_well_formed(path, r)


@FUZZ
@given(headers=st.dictionaries(
    st.sampled_from(["Authorization", "Content-Type", "X-Forwarded-For", "Origin", "Accept", "Content-Encoding",
                     "Transfer-Encoding-Hint", "Forwarded", "X-Real-IP", "Cookie"]),
    st.text(st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"), max_size=60), max_size=5))
def test_fuzz_headers(open_server: LiveServer, headers: dict[str, str]) -> None:
    body = json.dumps({"model": "lemoe", "messages": [{"role": "user", "content": "hi"}], "stream": False}).encode()
    for route in ("/api/chat", "/v1/chat/completions"):
        reply = call_from("127.0.0.1", open_server.url, "POST", route, headers, body)
        event(f"status {reply.status}")
        assert reply.status in (200, 400, 403), reply.body[:300]
        text = reply.body.decode("utf-8")
        assert_no_leak(text)
        if reply.status != 200:
            error = reply.json()["error"]
            assert isinstance(error, dict) if route.startswith("/v1/") else isinstance(error, str)

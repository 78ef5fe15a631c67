"""Wire details that clients depend on, checked with plain HTTP (PROTOCOL.md §1, §2, §4)."""

from __future__ import annotations

import json

import pytest
import requests

from tests.contract.conftest import RoutedServer

CODE_Q = [{"role": "user", "content": "write a python function that adds two numbers"}]


def ndjson_lines(response: requests.Response) -> list[dict]:
    raw = response.content.decode("utf-8")
    assert raw.endswith("\n")
    lines = raw.split("\n")[:-1]
    assert all(line.strip() for line in lines), "blank line in NDJSON stream"
    return [json.loads(line) for line in lines]


def sse_events(response: requests.Response) -> list[str]:
    raw = response.content.decode("utf-8")
    assert raw.endswith("\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: "):] for e in events]


# --- probes and listings ---

def test_root_is_the_ollama_probe(base_url: str) -> None:
    r = requests.get(base_url + "/")
    assert r.status_code == 200 and r.text == "Ollama is running"
    assert r.headers["Content-Type"].startswith("text/plain")
    head = requests.head(base_url + "/")
    assert head.status_code == 200 and head.content == b""


def test_version_is_numeric(base_url: str) -> None:
    r = requests.get(base_url + "/api/version")
    assert r.headers["Content-Type"].startswith("application/json")
    parts = r.json()["version"].split("-")[0].split(".")
    assert len(parts) == 3 and all(p.isdigit() for p in parts)


def test_tags_list_router_and_experts_with_tags(base_url: str) -> None:
    r = requests.get(base_url + "/api/tags")
    assert r.headers["Content-Type"].startswith("application/json")
    models = r.json()["models"]
    names = {m["name"] for m in models}
    assert {"lemoe:latest", "fallback:latest", "coder:latest", "writer:latest"} <= names
    for m in models:
        assert m["model"] == m["name"]
        assert len(m["digest"]) == 64 and m["size"] > 0
        assert all(m["details"][k] for k in ("format", "family", "parameter_size", "quantization_level"))
    fallback = next(m for m in models if m["name"] == "fallback:latest")
    assert fallback["details"]["format"] == "gguf" and fallback["size"] > 1_000_000


def test_v1_models_use_the_same_ids(base_url: str) -> None:
    data = requests.get(base_url + "/v1/models").json()
    assert data["object"] == "list"
    ids = {m["id"] for m in data["data"]}
    tags = {m["name"] for m in requests.get(base_url + "/api/tags").json()["models"]}
    assert ids == tags
    one = requests.get(base_url + "/v1/models/coder")
    assert one.status_code == 200 and one.json()["id"] == "coder:latest"


def test_show_accepts_model_or_name_and_has_model_info(base_url: str) -> None:
    for body in ({"model": "coder"}, {"name": "coder:latest"}, {"model": "LEMOE"}):
        r = requests.post(base_url + "/api/show", json=body)
        assert r.status_code == 200, body
        assert "model_info" in r.json() and "tools" in r.json()["template"].lower()
    assert requests.post(base_url + "/api/show", json={"model": "nope"}).status_code == 404
    missing = requests.post(base_url + "/api/show", json={})
    assert missing.status_code == 400 and missing.json() == {"error": "model is required"}


# --- Ollama chat / generate framing ---

def test_api_chat_streams_by_default(base_url: str) -> None:
    r = requests.post(base_url + "/api/chat", json={"model": "lemoe", "messages": CODE_Q})
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/x-ndjson"
    assert r.headers["X-LeMoE-Expert"] == "coder"
    assert r.headers["X-LeMoE-Route-Method"] == "keyword"
    assert float(r.headers["X-LeMoE-Route-Score"]) > 0
    lines = ndjson_lines(r)
    assert len(lines) >= 2
    for line in lines:
        assert line["model"] == "lemoe" and line["message"]["role"] == "assistant" and "done" in line
    assert "".join(line["message"]["content"] for line in lines) == "Hello from coder-model"
    last = lines[-1]
    assert last["done"] is True and last["done_reason"] == "stop"
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
                "eval_count", "eval_duration"):
        assert isinstance(last[key], int) and last[key] > 0, key
    assert all(line["done"] is False for line in lines[:-1])


def test_api_chat_non_streaming_is_one_json_object(base_url: str) -> None:
    r = requests.post(base_url + "/api/chat", json={"model": "coder:latest", "messages": CODE_Q, "stream": False})
    assert r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    assert body["message"]["content"] == "Hello from coder-model" and body["done"] is True
    assert r.headers["X-LeMoE-Route-Method"] == "direct"


def test_form_content_type_from_curl_is_accepted(base_url: str) -> None:
    # `curl -d` sends application/x-www-form-urlencoded; the README's example must still work.
    body = json.dumps({"model": "coder", "messages": CODE_Q, "stream": False})
    r = requests.post(base_url + "/api/chat", data=body,
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["message"]["content"] == "Hello from coder-model"


def test_load_and_unload_probes_answer_at_once(base_url: str) -> None:
    r = requests.post(base_url + "/api/generate", json={"model": "coder", "prompt": "", "keep_alive": 0})
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.json()["done_reason"] == "unload" and r.json()["done"] is True
    r = requests.post(base_url + "/api/chat", json={"model": "coder", "messages": []})
    assert r.json()["done_reason"] == "load" and r.json()["message"]["role"] == "assistant"


def test_api_generate_streams_response_pieces(base_url: str) -> None:
    r = requests.post(base_url + "/api/generate", json={"model": "coder", "prompt": "python code please"})
    lines = ndjson_lines(r)
    assert "".join(line["response"] for line in lines) == "Hello from coder-model"
    assert lines[-1]["done"] is True and "context" in lines[-1]


# --- OpenAI framing ---

def test_sse_stream_shape(base_url: str) -> None:
    r = requests.post(base_url + "/v1/chat/completions",
                      json={"model": "lemoe", "messages": CODE_Q, "stream": True,
                            "stream_options": {"include_usage": True}})
    assert r.headers["Content-Type"].startswith("text/event-stream")
    assert r.headers["X-Accel-Buffering"] == "no"
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    finish = chunks[-2]["choices"][0]
    assert finish["delta"] == {} and finish["finish_reason"] == "stop"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Hello from coder-model"


def test_openai_stream_defaults_to_off(base_url: str) -> None:
    r = requests.post(base_url + "/v1/chat/completions", json={"messages": CODE_Q})
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.json()["object"] == "chat.completion"
    assert r.json()["choices"][0]["finish_reason"] == "stop"


def test_route_dry_run(base_url: str) -> None:
    r = requests.post(base_url + "/v1/route", json={"messages": CODE_Q})
    body = r.json()
    assert body["expert"] == "coder" and body["method"] == "keyword"
    assert set(body["scores"]) >= {"coder", "writer"}
    cascade = requests.post(base_url + "/v1/route", json={"messages": [
        CODE_Q[0], {"role": "assistant", "content": "def add(a, b): ..."}, {"role": "user", "content": "make it shorter"}]})
    assert cascade.json()["expert"] == "coder" and cascade.json()["method"] == "cascade"


# --- errors in each protocol ---

OLLAMA_BAD = [
    ("POST", "/api/chat", b"{not json", 400),
    ("POST", "/api/chat", b"", 400),
    ("POST", "/api/chat", b'{"messages": []}', 400),
    ("POST", "/api/chat", b'{"model": 5, "messages": []}', 400),
    ("POST", "/api/chat", b'{"model": "lemoe", "messages": "hi"}', 400),
    ("POST", "/api/chat", b'{"model": "lemoe", "messages": [{"role": "wizard", "content": "x"}]}', 400),
    ("POST", "/api/chat", b'{"model": "lemoe", "messages": [{"role": "user", "content": 7}]}', 400),
    ("POST", "/api/chat", b'{"model": "lemoe", "stream": "yes", "messages": [{"role": "user", "content": "x"}]}', 400),
    ("POST", "/api/chat", b"\xff\xfe\x00garbage", 400),
    ("POST", "/api/chat", b"[1, 2, 3]", 400),
    ("POST", "/api/chat", b'{"model": "lemoe", "messages": [{"role": "user", "content": NaN}]}', 400),
    ("POST", "/api/generate", b'{"model": "lemoe", "prompt": "x", "raw": true, "system": "s"}', 400),
    ("GET", "/api/chat", b"", 405),
    ("DELETE", "/api/tags", b"", 405),
    ("GET", "/api/nothing-here", b"", 404),
]


@pytest.mark.parametrize(("method", "path", "body", "status"), OLLAMA_BAD)
def test_ollama_errors_are_json_in_ollama_shape(base_url: str, method: str, path: str, body: bytes, status: int) -> None:
    r = requests.request(method, base_url + path, data=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status
    assert r.headers["Content-Type"].startswith("application/json")
    payload = r.json()
    assert set(payload) == {"error"} and isinstance(payload["error"], str) and payload["error"]
    assert "Traceback" not in r.text and "/work/" not in r.text and ".py" not in r.text


OPENAI_BAD = [
    ("POST", "/v1/chat/completions", b"{not json", 400),
    ("POST", "/v1/chat/completions", b'{"messages": []}', 400),
    ("POST", "/v1/chat/completions", b'{"model": "lemoe"}', 400),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', 400),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -3}', 400),
    ("POST", "/v1/completions", b'{"model": "lemoe", "prompt": 12}', 400),
    ("GET", "/v1/models/no-such-model", b"", 404),
    ("GET", "/v1/chat/completions", b"", 405),
    ("GET", "/v1/nothing", b"", 404),
]


@pytest.mark.parametrize(("method", "path", "body", "status"), OPENAI_BAD)
def test_openai_errors_are_openai_error_objects(base_url: str, method: str, path: str, body: bytes, status: int) -> None:
    r = requests.request(method, base_url + path, data=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status
    assert r.headers["Content-Type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in r.text and "/work/" not in r.text


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_body_over_one_megabyte_is_413_in_protocol(base_url: str, path: str) -> None:
    big = json.dumps({"model": "lemoe", "messages": [{"role": "user", "content": "x" * 1_100_000}]})
    r = requests.post(base_url + path, data=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    body = r.json()
    assert isinstance(body["error"], dict if path.startswith("/v1") else str)


def test_server_still_serves_after_errors(lemoe_server: RoutedServer) -> None:
    for _ in range(3):
        requests.post(lemoe_server.url + "/api/chat", data=b"{bad")
    assert requests.get(lemoe_server.url + "/api/tags").status_code == 200
    assert lemoe_server.process.poll() is None

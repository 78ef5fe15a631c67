"""Hostile requests against a live server: every case asserts the exact status and the exact error
body in the protocol of the route (`{"error": "..."}` on Ollama routes, Anthropic's error object on
/v1/messages, the OpenAI error object on the rest of /v1/*), and that no traceback or internal
path leaks.

Cases: malformed and truncated JSON, non-object bodies, a wrong type in each field of each API,
huge and deeply nested bodies, invalid UTF-8, control/ANSI characters and traversal in looked-up
names, unknown routes and wrong methods.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from tests.live_server import LiveServer

OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 405: "invalid_request_error", 408: "api_error",
                413: "invalid_request_error", 414: "invalid_request_error", 429: "rate_limit_error",
                431: "invalid_request_error", 501: "api_error", 503: "api_error"}
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                   405: "invalid_request_error", 413: "request_too_large", 429: "rate_limit_error",
                   503: "overloaded_error"}
POST_ROUTES = ("/api/chat", "/api/generate", "/api/show", "/v1/chat/completions", "/v1/completions", "/v1/route",
               "/api/embed", "/api/embeddings", "/v1/embeddings", "/v1/messages", "/v1/messages/count_tokens",
               "/v1/responses")
INFERENCE_ROUTES = ("/api/chat", "/api/generate", "/v1/chat/completions", "/v1/completions",
                    "/api/embed", "/api/embeddings", "/v1/embeddings", "/v1/messages", "/v1/responses")


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str
    body: bytes | None
    status: int
    message: str
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


def expected_error(path: str, status: int, message: str, code: str | None = None) -> dict[str, Any]:
    """The exact error body a client of that route must get."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return {"type": "error", "error": {"type": ANTHROPIC_TYPES[status], "message": message}}
    if path.startswith("/v1/") or path == "/v1":
        return {"error": {"message": message, "type": OPENAI_TYPES[status], "param": None, "code": code}}
    return {"error": message}


def assert_error(r: requests.Response, path: str, status: int, message: str, code: str | None = None) -> None:
    assert r.status_code == status, r.text[:300]
    assert r.headers["Content-Type"] == "application/json; charset=utf-8"
    assert r.json() == expected_error(path, status, message, code)
    assert_no_leak(r.text)


def assert_no_leak(text: str) -> None:
    for needle in ("Traceback", 'File "', "/work/", "site-packages", "modules/", ".py\""):
        assert needle not in text


def slug(path: str) -> str:
    return path.strip("/").replace("/", "-") or "root"


def as_json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


# --- malformed and truncated JSON: the same message whatever the route ---------------------------

BAD_JSON = {
    "truncated": (b'{"model": "lemoe", "messages": [', "invalid JSON: Expecting value (line 1, column 33)"),
    "open-brace": (b"{", "invalid JSON: Expecting property name enclosed in double quotes (line 1, column 2)"),
    "trailing-comma": (b'{"model": "x",}',
                       "invalid JSON: Expecting property name enclosed in double quotes (line 1, column 15)"),
    "single-quotes": (b"{'model': 'x'}",
                      "invalid JSON: Expecting property name enclosed in double quotes (line 1, column 2)"),
    "bare-word": (b"hello", "invalid JSON: Expecting value (line 1, column 1)"),
    "nan": (b'{"temperature": NaN}', "invalid JSON: NaN is not a valid JSON value"),
    "empty": (b"", "missing request body"),
    "whitespace": (b"   \n\t ", "invalid JSON: Expecting value (line 2, column 3)"),
    "bom": (b'\xef\xbb\xbf{"model": "x"}',
            "invalid JSON: Unexpected UTF-8 BOM (decode using utf-8-sig) (line 1, column 1)"),
}
CASES = [Case(f"json-{name}-{slug(route)}", "POST", route, body, 400, message)
         for route in POST_ROUTES for name, (body, message) in BAD_JSON.items()]

# --- bodies that are JSON but not an object ------------------------------------------------------

for route in INFERENCE_ROUTES:
    message = ("The request body must be a JSON object." if route.startswith("/v1/")
               else "request body must be a JSON object")
    CASES += [Case(f"not-object-{name}-{slug(route)}", "POST", route, body, 400, message)
              for name, body in {"array": b"[]", "string": b'"hi"', "number": b"42", "null": b"null"}.items()]

# --- a wrong type in each field --------------------------------------------------------------------

OLLAMA_CHAT = {"model": "lemoe", "messages": [{"role": "user", "content": "hi"}]}
OLLAMA_CHAT_FIELDS: list[tuple[str, Any, str]] = [
    ("model", 5, "model is required"),
    ("model", ["lemoe"], "model is required"),
    ("messages", "hi", "messages must be a list"),
    ("messages", {"role": "user"}, "messages must be a list"),
    ("messages", [1], "messages[0] must be an object"),
    ("messages", [{"role": 5, "content": "hi"}], "messages[0].role must be one of system, user, assistant, tool"),
    ("messages", [{"role": "wizard", "content": "hi"}],
     "messages[0].role must be one of system, user, assistant, tool"),
    ("messages", [{"role": "user", "content": 5}], "messages[0].content must be a string"),
    ("messages", [{"role": "user", "content": "hi", "images": "x"}],
     "messages[0].images must be a list of base64 strings"),
    ("messages", [{"role": "assistant", "content": "", "tool_calls": "x"}], "messages[0].tool_calls must be a list"),
    ("stream", "yes", "stream must be a boolean"),
    ("stream", 1, "stream must be a boolean"),
    ("options", [], "options must be an object"),
    ("options", {"temperature": "hot"}, "options.temperature must be a number"),
    ("options", {"num_predict": "many"}, "options.num_predict must be an integer"),
    ("format", 5, 'format must be "json" or a JSON schema object'),
    ("keep_alive", [], 'keep_alive must be a duration such as "5m" or a number of seconds'),
    ("think", "maybe", 'think must be true, false, "low", "medium", "high" or "max"'),
    ("tools", "x", "tools must be a list of objects"),
    ("tools", [5], "tools must be a list of objects"),
]
CASES += [Case(f"ollama-chat-{name}-{i}", "POST", "/api/chat", as_json({**OLLAMA_CHAT, name: value}), 400, message)
          for i, (name, value, message) in enumerate(OLLAMA_CHAT_FIELDS)]

OLLAMA_GENERATE = {"model": "lemoe", "prompt": "hi"}
OLLAMA_GENERATE_FIELDS: list[tuple[str, Any, str]] = [
    ("model", {}, "model is required"),
    ("prompt", 5, "prompt must be a string"),
    ("prompt", ["hi"], "prompt must be a string"),
    ("system", 5, "system must be a string"),
    ("images", "x", "images must be a list of base64 strings"),
    ("options", "x", "options must be an object"),
    ("stream", "no", "stream must be a boolean"),
    ("raw", "x", "raw must be a boolean"),
    ("suffix", 5, "suffix must be a string"),
]
CASES += [Case(f"ollama-generate-{name}-{i}", "POST", "/api/generate", as_json({**OLLAMA_GENERATE, name: value}),
               400, message) for i, (name, value, message) in enumerate(OLLAMA_GENERATE_FIELDS)]


def openai_type_error(name: str, expected: str, got: str) -> str:
    return f"Invalid type for '{name}': expected {expected}, but got {got} instead."


OPENAI_CHAT = {"model": "lemoe", "messages": [{"role": "user", "content": "hi"}]}
OPENAI_CHAT_FIELDS: list[tuple[str, Any, str]] = [
    ("model", 5, openai_type_error("model", "a string", "an integer")),
    ("messages", "hi", openai_type_error("messages", "an array", "a string")),
    ("messages", [], "[] is too short - 'messages'"),
    ("messages", [None], openai_type_error("messages[0]", "an object", "null")),
    ("messages", [{"content": "hi"}], "Invalid value for 'messages[0].role': must be one of 'system', 'developer', "
                                      "'user', 'assistant', 'tool', 'function'."),
    ("messages", [{"role": "user", "content": 5}],
     openai_type_error("messages[0].content", "a string, null or an array of content parts", "an integer")),
    ("messages", [{"role": "user", "content": [{"type": "text"}]}],
     openai_type_error("messages[0].content[0].text", "a string", "null")),
    ("stream", "yes", openai_type_error("stream", "a boolean", "a string")),
    ("temperature", "hot", openai_type_error("temperature", "a number", "a string")),
    ("top_p", [], openai_type_error("top_p", "a number", "an array")),
    ("max_tokens", "10", openai_type_error("max_tokens", "an integer", "a string")),
    ("max_tokens", 1.5, openai_type_error("max_tokens", "an integer", "a number")),
    ("max_completion_tokens", "x", openai_type_error("max_completion_tokens", "an integer", "a string")),
    ("stop", 5, openai_type_error("stop", "a string or an array of strings", "an integer")),
    ("seed", "x", openai_type_error("seed", "an integer", "a string")),
    ("presence_penalty", {}, openai_type_error("presence_penalty", "a number", "an object")),
    ("frequency_penalty", "x", openai_type_error("frequency_penalty", "a number", "a string")),
    ("n", "two", openai_type_error("n", "an integer", "a string")),
    ("tools", "x", openai_type_error("tools", "an array", "a string")),
    ("response_format", "json", openai_type_error("response_format", "an object", "a string")),
    ("stream_options", "x", openai_type_error("stream_options", "an object", "a string")),
    ("stream_options", {"include_usage": "yes"},
     openai_type_error("stream_options.include_usage", "a boolean", "a string")),
    ("reasoning_effort", 5, "Invalid value for 'reasoning_effort': must be one of 'none', 'minimal', 'low', "
                            "'medium', 'high', 'xhigh'."),
]
CASES += [Case(f"openai-chat-{name}-{i}", "POST", "/v1/chat/completions", as_json({**OPENAI_CHAT, name: value}),
               400, message) for i, (name, value, message) in enumerate(OPENAI_CHAT_FIELDS)]

ONE_PROMPT = "Invalid value for 'prompt': expected a string or a list holding exactly one string."
OPENAI_COMPLETION = {"model": "lemoe", "prompt": "hi"}
OPENAI_COMPLETION_FIELDS: list[tuple[str, Any, str]] = [
    ("prompt", 5, ONE_PROMPT),
    ("prompt", [1, 2], ONE_PROMPT),
    ("prompt", ["a", "b"], ONE_PROMPT),
    ("prompt", None, "Missing required parameter: 'prompt'."),
    ("suffix", 5, openai_type_error("suffix", "a string", "an integer")),
    ("max_tokens", "x", openai_type_error("max_tokens", "an integer", "a string")),
    ("stream", "x", openai_type_error("stream", "a boolean", "a string")),
    ("temperature", "x", openai_type_error("temperature", "a number", "a string")),
]
CASES += [Case(f"openai-completion-{name}-{i}", "POST", "/v1/completions",
               as_json({**OPENAI_COMPLETION, name: value}), 400, message)
          for i, (name, value, message) in enumerate(OPENAI_COMPLETION_FIELDS)]

ANTHROPIC = {"model": "claude", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
ANTHROPIC_FIELDS: list[tuple[str, Any, str]] = [
    ("model", 5, openai_type_error("model", "a string", "an integer")),
    ("max_tokens", None, "max_tokens: Field required"),
    ("max_tokens", "64", openai_type_error("max_tokens", "an integer", "a string")),
    ("max_tokens", 0, "max_tokens: must be at least 1"),
    ("messages", None, "messages: Field required"),
    ("messages", "hi", openai_type_error("messages", "an array", "a string")),
    ("messages", [], "messages: at least one message is required"),
    ("messages", [{"role": "system", "content": "x"}], "messages.0.role: must be 'user' or 'assistant'"),
    ("messages", [{"role": "user", "content": 5}],
     openai_type_error("messages.0.content", "a string or an array of content blocks", "an integer")),
    ("messages", [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://169.254.169.254/"}}]}],
     "messages.0.content.0.source.type: only 'base64' image sources are supported"),
    ("system", 5, openai_type_error("system", "a string or an array of text blocks", "an integer")),
    ("temperature", "hot", openai_type_error("temperature", "a number", "a string")),
    ("temperature", 2, "temperature: must be between 0 and 1"),
    ("top_k", 1.5, openai_type_error("top_k", "an integer", "a number")),
    ("stop_sequences", "END", openai_type_error("stop_sequences", "an array of strings", "a string")),
    ("stream", "yes", openai_type_error("stream", "a boolean", "a string")),
    ("tools", {"name": "x"}, openai_type_error("tools", "an array", "an object")),
    ("tool_choice", {"type": "sometimes"}, "tool_choice.type: must be one of 'auto', 'any', 'tool', 'none'"),
    ("thinking", {"type": "enabled"},
     "thinking.budget_tokens: required, a positive integer, when thinking is enabled"),
]
CASES += [Case(f"anthropic-{name}-{i}", "POST", "/v1/messages",
               as_json({k: v for k, v in {**ANTHROPIC, name: value}.items() if v is not None}), 400, message)
          for i, (name, value, message) in enumerate(ANTHROPIC_FIELDS)]

RESPONSES = {"model": "lemoe", "input": "hi"}
RESPONSES_FIELDS: list[tuple[str, Any, str]] = [
    ("model", 5, openai_type_error("model", "a string", "an integer")),
    ("input", None, "Missing required parameter: 'input'."),
    ("input", 5, openai_type_error("input", "a string or an array of input items", "an integer")),
    ("input", [], "Invalid 'input': empty array. Expected at least one input item."),
    ("input", [{"type": "mystery"}], "Invalid value for 'input[0].type': unknown input item type 'mystery'."),
    ("input", [{"role": "user", "content": [{"type": "input_image", "image_url": "http://169.254.169.254/x"}]}],
     "Invalid value for 'input[0].content[0].image_url.url': only base64 'data:' URLs are supported."),
    ("instructions", ["x"], openai_type_error("instructions", "a string", "an array")),
    ("temperature", "hot", openai_type_error("temperature", "a number", "a string")),
    ("max_output_tokens", "10", openai_type_error("max_output_tokens", "an integer", "a string")),
    ("stream", "yes", openai_type_error("stream", "a boolean", "a string")),
    ("tools", "x", openai_type_error("tools", "an array", "a string")),
    ("text", "json", openai_type_error("text", "an object", "a string")),
    ("reasoning", {"effort": "huge"}, "Invalid value for 'reasoning.effort': must be one of 'none', 'minimal', "
                                      "'low', 'medium', 'high', 'xhigh'."),
    ("previous_response_id", "resp_1", "'previous_response_id' is not supported: LeMoE does not store responses; "
                                       "send the whole conversation in 'input'."),
]
CASES += [Case(f"responses-{name}-{i}", "POST", "/v1/responses",
               as_json({k: v for k, v in {**RESPONSES, name: value}.items() if v is not None}), 400, message)
          for i, (name, value, message) in enumerate(RESPONSES_FIELDS)]

CASES += [Case(f"show-model-{i}", "POST", "/api/show", as_json({"model": value}), 400, "model is required")
          for i, value in enumerate([5, None, ["x"], {}])]
CASES += [
    Case("route-messages-string", "POST", "/v1/route", as_json({"messages": "hi"}), 400,
         openai_type_error("messages", "an array", "a string")),
    Case("route-no-messages", "POST", "/v1/route", as_json({}), 400, "Missing required parameter: 'messages'."),
]

# --- huge and deeply nested bodies -----------------------------------------------------------------

CASES += [Case(f"huge-{slug(route)}", "POST", route, b'{"x": "' + b"a" * 1_100_000 + b'"}', 413,
               "request body is larger than 1048576 bytes; raise server.max_body_bytes to accept it")
          for route in POST_ROUTES]
DEEP = {
    "array": b"[" * 50_000 + b"]" * 50_000,
    "object": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "in-content": b'{"messages": [{"role": "user", "content": ' + b"[" * 30_000 + b"]" * 30_000 + b"}]}",
}
CASES += [Case(f"deep-{name}-{slug(route)}", "POST", route, body, 400, "invalid JSON: nested too deeply")
          for route in ("/api/chat", "/v1/chat/completions", "/api/generate", "/v1/messages", "/v1/responses")
          for name, body in DEEP.items()]

# --- invalid UTF-8 --------------------------------------------------------------------------------

BAD_UTF8 = {"ff": b'{"model": "\xff"}', "overlong": b'{"model": "\xc0\xaf"}',
            "surrogate": b'{"model": "\xed\xa0\x80"}', "cut-multibyte": b'{"model": "\xe2\x82"}'}
CASES += [Case(f"utf8-{name}-{slug(route)}", "POST", route, body, 400, "request body is not valid UTF-8")
          for route in INFERENCE_ROUTES for name, body in BAD_UTF8.items()]

# --- control characters, ANSI escapes and traversal in looked-up names --------------------------

HOSTILE_NAMES = {"ansi": "\x1b[31mred\x1b[0m", "nul": "a\x00b", "newline": "x\nINFO forged line",
                 "traversal": "../../etc/passwd", "backslash": "..\\..\\boot.ini", "bell-osc": "\x1b]0;pwned\x07"}
CASES += [Case(f"show-name-{name}", "POST", "/api/show", as_json({"model": value}), 404, f"model '{value}' not found")
          for name, value in HOSTILE_NAMES.items()]
CASES += [
    Case("openai-model-ansi", "GET", "/v1/models/%1B[31mred", None, 404, "The model '\x1b[31mred' does not exist",
         code="model_not_found"),
    Case("openai-model-nul", "GET", "/v1/models/a%00b", None, 404, "The model 'a\x00b' does not exist",
         code="model_not_found"),
    Case("openai-model-encoded-traversal", "GET", "/v1/models/..%2F..%2Fetc%2Fpasswd", None, 404,
         "The model '../../etc/passwd' does not exist", code="model_not_found"),
    Case("openai-model-backslash", "GET", "/v1/models/..%5C..%5Cboot.ini", None, 404,
         "The model '..\\..\\boot.ini' does not exist", code="model_not_found"),
]

# --- unknown routes and wrong methods --------------------------------------------------------------

UNKNOWN_PATHS = ("/api/pull", "/api/push", "/api/delete", "/api/create", "/api/copy",
                 "/v1/images/generations", "/v1/audio/speech", "/admin",
                 "/.env", "/api", "/v1", "/api/chat/extra", "/v1/chat", "/%2e%2e/%2e%2e/etc/passwd",
                 "/v1/messages/batches", "/v1/responses/resp_1")
for path in UNKNOWN_PATHS:
    shown = path.replace("%2e", ".")
    CASES += [Case(f"unknown-{method}-{slug(path)}", method, path, as_json(OPENAI_CHAT) if method == "POST" else None,
                   404, f"{method} {shown} not found") for method in ("GET", "POST")]
WRONG_METHODS = {"/api/chat": ("GET", "PUT", "DELETE", "PATCH"),
                 "/v1/chat/completions": ("GET", "PUT", "DELETE", "PATCH"),
                 "/api/generate": ("GET",), "/api/show": ("GET",), "/v1/completions": ("GET",), "/v1/route": ("GET",),
                 "/api/tags": ("POST", "DELETE"), "/v1/models": ("POST", "DELETE"), "/api/version": ("POST",),
                 "/api/ps": ("POST",), "/": ("POST", "DELETE"),
                 "/api/embed": ("GET",), "/api/embeddings": ("GET",), "/v1/embeddings": ("GET", "PUT"),
                 "/v1/messages": ("GET", "DELETE"), "/v1/messages/count_tokens": ("GET",),
                 "/v1/responses": ("GET", "PUT")}
CASES += [Case(f"method-{method}-{slug(path)}", method, path, None, 405, f"method {method} not allowed on {path}")
          for path, methods in WRONG_METHODS.items() for method in methods]


def test_the_suite_is_large_and_every_case_distinct() -> None:
    assert len(CASES) >= 120
    assert len({c.id for c in CASES}) == len(CASES)
    assert len({(c.method, c.path, c.body) for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_request_gets_exact_error(open_server: LiveServer, case: Case) -> None:
    r = requests.request(case.method, open_server.url + case.path, data=case.body, headers=case.headers, timeout=30)
    assert_error(r, case.path, case.status, case.message, case.code)
    if case.status == 405:
        assert r.headers["Allow"]


def test_server_still_serves_after_the_hostile_cases(open_server: LiveServer) -> None:
    r = requests.post(open_server.url + "/api/chat", json={**OLLAMA_CHAT, "stream": False}, timeout=30)
    assert r.status_code == 200 and r.json()["message"]["content"] == "Hello from fallback-model"


# --- prompt text that tries to forge log lines ------------------------------------------------------

FORGED = "2026-01-01 00:00:00,000 ERROR [1] lemoe.server: FORGED admin login"
INJECTIONS = {
    "newline": f"weather\n{FORGED}",
    "carriage-return": f"weather\r{FORGED}",
    "crlf": f"weather\r\n{FORGED}",
    "unicode-line-separator": f"weather\u2028{FORGED}",
    "ansi-clear-screen": f"weather\x1b[2J\x1b[H{FORGED}",
    "ansi-color": f"\x1b[31mweather\x1b[0m\n{FORGED}",
    "osc-title": f"weather\x1b]0;pwned\x07\n{FORGED}",
    "nul-and-bell": f"weather\x00\x07\n{FORGED}",
    "c1-controls": f"weather\x85\x9b31m\n{FORGED}",
}


@pytest.mark.parametrize("route", ["/api/chat", "/v1/chat/completions"])
@pytest.mark.parametrize("name", list(INJECTIONS))
def test_prompt_cannot_forge_log_lines(open_server: LiveServer, route: str, name: str) -> None:
    text = INJECTIONS[name]
    body = {"model": f"lemoe\n{FORGED}", "messages": [{"role": "user", "content": text}], "stream": False}
    r = requests.post(open_server.url + route, json=body, timeout=30)
    assert r.status_code == 200
    log = open_server.log_text()
    assert "FORGED admin login" in log, "the text is logged (sanitised), not dropped"
    for line in log.splitlines():
        assert not line.startswith(FORGED), f"forged log line: {line!r}"
    assert not any(ch in log for ch in "\x1b\x00\x07\x85\x9b\u2028\r")

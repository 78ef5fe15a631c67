"""LeMoE's HTTP server: the app factory, the route table and the error handlers.

Run it with `./start.sh`, `python api_server.py [--config FILE] [--host H] [--port P]` (gunicorn
with gevent workers), `python api_server.py --dev` (Flask's development server), or
`gunicorn -k gevent 'api_server:create_app()'`.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # The server command (modules/ops/serve.py), before any other import: gevent must patch before
    # a lock or socket exists (modules/blocking.py), and the gunicorn master has no use for
    # Flask and the rest of this file; its workers import it again, as `api_server`.
    if "--dev" not in sys.argv:
        from modules.blocking import patch_for_gevent

        patch_for_gevent()
    from modules.ops.serve import main

    sys.exit(main())

from typing import Any

from flask import Flask, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from modules.ops import health

from modules.ops import metrics

from modules.ops import web_ui
from modules import http_views as views
from modules.services import Services, json_response
from modules.guards.api_keys import init_api_keys
from modules.guards.body_limit import IMAGE_LIMIT_KEY, image_body_limit, init_body_limit, init_image_body_limit, too_large
from modules.guards.client_timeouts import init_client_timeouts
from modules.config_manager import AppConfig, config_from_environment
from modules.guards.cors import init_cors
from modules.decision_cache import router_name
from modules.errors import (
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    RequestError,
)
from modules.ops.hot_reload import watch_config
from modules.logger import get_logger, setup_logging
from modules.model_pool import ModelPool
from modules.guards.rate_limit import init_rate_limit

log = get_logger("server")
# The routes whose requests may carry images, so their bodies may be up to server.max_image_body_bytes.
IMAGE_ENDPOINTS = ("ollama_chat", "ollama_generate", "openai_chat_completions", "openai_responses",
                   "anthropic_messages", "anthropic_count_tokens")


def create_app(config: AppConfig | None = None) -> Flask:
    config = config or config_from_environment()
    setup_logging(config.server, config.project_dir)
    # No static folder: every URL is in the route table below, nothing is served from disk.
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = config.server.max_body_bytes
    app.config[IMAGE_LIMIT_KEY] = image_body_limit(config.server.max_body_bytes, config.server.max_image_body_bytes)
    app.extensions["lemoe"] = build_services(config)
    register_routes(app)
    register_error_handlers(app)
    # Guards, in the order they run on a request: CORS (answers preflights), rate limit, API
    # key, then the bounded read of the body and the cap on bodies of no declared length.
    init_cors(app, config.cors, _error_response)
    init_rate_limit(app, config.rate_limit, _error_response)
    init_api_keys(app, config.auth, config.project_dir, _error_response)
    init_image_body_limit(app, IMAGE_ENDPOINTS)
    init_client_timeouts(app, config.server.client_timeout, _error_response)
    init_body_limit(app, _error_response)
    metrics.init_metrics(app)
    watch_config(app, rebuild_services)
    log.info("LeMoE ready: %d experts, router=%s", len(config.experts), router_name(app.extensions["lemoe"].router))
    return app


def build_services(config: AppConfig, pool: ModelPool | None = None) -> Services:
    """Router, runner and catalog for `config`, around `pool` (a new one when None)."""
    from modules.embedding_runner import build_embedding_runner
    from modules.expert_runner import build_runner
    from modules.model_catalog import LocalEncoderListing, ModelCatalog
    from modules.decision_cache import DecisionCache
    from modules.blocking import run_blocking
    from modules.router_factory import OffLoopRouter, build_router

    if pool is None:
        pool = ModelPool(config.local_models.max_loaded_models, config.local_models.model_ttl_seconds)
        pool.start_reaper(interval=min(30.0, max(1.0, config.local_models.model_ttl_seconds / 4)))
    embeddings = build_embedding_runner(config, pool)
    local = None
    if embeddings.local_label is not None and embeddings.local_dimensions is not None:
        local = LocalEncoderListing(embeddings.local_label, embeddings.local_dimensions,
                                    config.embeddings.max_input_chars)
    return Services(
        config=config,
        # Built off the event loop (an encoder load, the first encoding of the experts' keywords:
        # seconds, and on a config reload the worker is serving), and deciding off it too.
        router=DecisionCache(OffLoopRouter(run_blocking(build_router, config)), config.router.decision_cache_size),
        runner=build_runner(config, pool),
        catalog=ModelCatalog(config, local),
        pool=pool,
        embeddings=embeddings,
    )


def rebuild_services(config: AppConfig, running: Services) -> Services:
    """Services for a reloaded `config` that keep the running model pool, so loaded models stay;
    its new limits apply from the next load or eviction on."""
    services = build_services(config, pool=running.pool)
    running.pool.max_loaded = config.local_models.max_loaded_models
    running.pool.ttl_seconds = config.local_models.model_ttl_seconds
    return services


def register_routes(app: Flask) -> None:
    add = app.add_url_rule
    # Ollama API
    add("/", "ollama_root", views.ollama_root, methods=["GET"])
    add("/api/version", "ollama_version", views.ollama_version, methods=["GET"])
    add("/api/tags", "ollama_tags", views.ollama_tags, methods=["GET"])
    add("/api/show", "ollama_show", views.ollama_show, methods=["POST"])
    add("/api/ps", "ollama_ps", views.ollama_ps, methods=["GET"])
    add("/api/chat", "ollama_chat", views.ollama_chat, methods=["POST"])
    add("/api/generate", "ollama_generate", views.ollama_generate, methods=["POST"])
    add("/api/embed", "ollama_embed", views.ollama_embed, methods=["POST"])
    add("/api/embeddings", "ollama_embeddings", views.ollama_embeddings, methods=["POST"])
    # OpenAI API
    add("/v1/models", "openai_models", views.openai_models, methods=["GET"])
    add("/v1/models/<path:model_id>", "openai_model", views.openai_model, methods=["GET"])
    add("/v1/chat/completions", "openai_chat_completions", views.openai_chat_completions, methods=["POST"])
    add("/v1/completions", "openai_completions", views.openai_completions, methods=["POST"])
    add("/v1/embeddings", "openai_embeddings", views.openai_embeddings, methods=["POST"])
    add("/v1/responses", "openai_responses", views.openai_responses, methods=["POST"])
    # Anthropic API (Claude Code with ANTHROPIC_BASE_URL)
    add("/v1/messages", "anthropic_messages", views.anthropic_messages, methods=["POST"])
    add("/v1/messages/count_tokens", "anthropic_count_tokens", views.anthropic_count_tokens, methods=["POST"])
    # LeMoE
    add("/v1/route", "lemoe_route", views.lemoe_route, methods=["POST"])
    # Operations: probes (free of the rate limit and API keys), metrics, the tuning page
    add("/health", "health", health.health, methods=["GET"])
    add("/ready", "ready", health.ready, methods=["GET"])
    add("/metrics", "metrics", metrics.serve_metrics, methods=["GET"])
    add("/ui", "web_ui", web_ui.ui_page, methods=["GET"])
    add("/ui/state", "web_ui_state", web_ui.ui_state, methods=["GET"])


def _error_response(err: RequestError) -> Any:
    from modules.protocol.error_bodies import error_body_for_path

    body, status = error_body_for_path(request.path, err)
    headers = {}
    if err.retry_after is not None:
        headers["Retry-After"] = str(err.retry_after)
    if status >= 500:
        # openai-python retries 5xx twice by default; retrying cannot help when no expert answers.
        headers["x-should-retry"] = "false"
    return json_response(body, status, headers)


def register_error_handlers(app: Flask) -> None:
    """Every error leaves in the client's own protocol; never an HTML page or a traceback."""

    @app.errorhandler(RequestError)
    def _request_error(err: RequestError) -> Any:
        return _error_response(err)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        if isinstance(exc, RequestEntityTooLarge):
            return _error_response(too_large(request.max_content_length or app.config["MAX_CONTENT_LENGTH"]))
        if exc.code == 404:
            return _error_response(NotFound(f"{request.method} {request.path} not found"))
        if exc.code == 405:
            response = _error_response(MethodNotAllowed(f"method {request.method} not allowed on {request.path}"))
            response.headers["Allow"] = ", ".join(exc.valid_methods or [])  # type: ignore[attr-defined]
            return response
        err = InvalidRequest(exc.description or exc.name)
        err.status_code = exc.code or 400  # type: ignore[misc]
        return _error_response(err)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        log.exception("unhandled error on %s %s", request.method, request.path)
        err = RequestError("internal server error")
        err.status_code = 500  # type: ignore[misc]
        return _error_response(err)

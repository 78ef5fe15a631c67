"""What one app serves with, built once by the factory, and the JSON responses every view writes.

The views (http_views) and the operations endpoints (health, web UI, hot reload) all take the
same Services; they live here so that operations code depends on this small module instead of
on the request views.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from flask import Response, current_app

from modules.config_manager import AppConfig
from modules.embedding_runner import EmbeddingRunner
from modules.expert_runner import ExpertRunner
from modules.model_catalog import ModelCatalog
from modules.model_pool import ModelPool
from modules.router_factory import Router

_JSON = "application/json; charset=utf-8"


@dataclass
class Services:
    """Everything the views need, built once per app by the factory."""

    config: AppConfig
    router: Router
    runner: ExpertRunner
    catalog: ModelCatalog
    pool: ModelPool
    embeddings: EmbeddingRunner

    def close(self) -> None:
        self.runner.close()
        self.embeddings.close()
        self.pool.close()


def services() -> Services:
    return current_app.extensions["lemoe"]  # type: ignore[no-any-return]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return json_text_response(json.dumps(body, ensure_ascii=False, separators=(",", ":")), status, headers)


def json_text_response(text: str, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A body the protocol layer already wrote as JSON text."""
    return Response(text, status=status, content_type=_JSON, headers=headers)

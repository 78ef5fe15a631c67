"""Build the router that the configuration asks for.

Every router has the same small interface: it reads the user turns of a conversation (plain
strings, oldest first) and returns a `RouteDecision`. Routers never see HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from modules.chat_types import RouteDecision
from modules.config_manager import AppConfig
from modules.errors import ConfigError


class Router(Protocol):
    def route(self, user_texts: Sequence[str]) -> RouteDecision:
        """Choose an expert for the conversation whose user turns are `user_texts`."""
        ...


class OffLoopRouter:
    """`router`, deciding on gevent's pool of real threads when the server runs under gevent.

    A decision is CPU work that never yields (an encoder pass is 5 to 15 ms for a long message,
    a cascade two of them, a classifier's forward pass more); on the worker's one event loop it
    would hold every other request meanwhile. Off the loop, the other requests run while it is
    computed (modules/blocking.py). Without gevent it is a plain call.
    """

    def __init__(self, router: Router) -> None:
        self.router = router

    def route(self, user_texts: Sequence[str]) -> RouteDecision:
        from modules.blocking import run_blocking

        return run_blocking(self.router.route, user_texts)


def build_router(config: AppConfig) -> Router:
    """keyword-only when `model_path` is "", the classifier for mode "model" / router_type
    "classification", else the hybrid embedding router."""
    if config.router.model_path and (config.router.mode == "model" or config.router.router_type == "classification"):
        from pathlib import Path

        from modules.decision_router import DecisionRouter

        model_dir = Path(config.router.model_path)
        if not model_dir.is_absolute():
            model_dir = config.project_dir / model_dir
        try:
            return DecisionRouter(config.experts, config.router, model_dir)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"{config.config_path}: router.model_path: {exc}") from exc
    from modules.embedding_router import build_embedding_router

    return build_embedding_router(config)

"""Build the router that the configuration asks for.

Every router has the same small interface: it reads the user turns of a conversation (plain
strings, oldest first) and returns a `RouteDecision`. Routers never see HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from modules.chat_types import RouteDecision
from modules.config_manager import AppConfig


class Router(Protocol):
    def route(self, user_texts: Sequence[str]) -> RouteDecision:
        """Choose an expert for the conversation whose user turns are `user_texts`."""
        ...


def build_router(config: AppConfig) -> Router:
    from modules.generic_router import KeywordRouter
    from modules.logger import get_logger

    if config.router.model_path:
        get_logger("router").warning(
            "router.model_path '%s' is set, but this release routes with keywords only", config.router.model_path)

    return KeywordRouter(config.experts, config.router)

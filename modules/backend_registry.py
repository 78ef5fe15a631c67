"""Which backend serves which expert `type`: one builder per type, looked up in a dict.

Adding a backend is one function and one line in `BACKEND_BUILDERS`. An expert whose backend
cannot be built (a missing file, a missing library) does not stop the server: it gets a
stand-in that fails at request time, so the runner answers with the fallback expert.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from modules.backend import Backend
from modules.chat_types import ChatEvent, ChatRequest
from modules.config_manager import AppConfig, ExpertConfig, resolve_local_model_path
from modules.errors import ExpertUnavailable
from modules.logger import get_logger
from modules.model_pool import ModelPool

log = get_logger("backends")


@dataclass
class _Unavailable:
    """Stands in for an expert whose backend could not be built, so it falls back at run time."""

    reason: str
    closed: bool = field(default=False)

    def stream_chat(self, request: ChatRequest) -> Iterator[ChatEvent]:
        raise ExpertUnavailable(self.reason)

    def close(self) -> None:
        self.closed = True


def _build_ollama(expert: ExpertConfig, config: AppConfig, pool: ModelPool) -> Backend:
    from modules.http_backends import OllamaBackend

    return OllamaBackend(expert, config.server)


def _build_openai(expert: ExpertConfig, config: AppConfig, pool: ModelPool) -> Backend:
    from modules.http_backends import OpenAIBackend

    return OpenAIBackend(expert, config.server)


def _build_local(expert: ExpertConfig, config: AppConfig, pool: ModelPool) -> Backend:
    assert expert.model_path is not None  # guaranteed by config validation
    path = resolve_local_model_path(expert.model_path, config.project_dir, config.local_models.models_dir)
    if expert.format == "gguf":
        from modules.ai_engine import GGUFBackend

        return GGUFBackend(expert, path, pool, config.local_models)
    return _Unavailable(f"local format '{expert.format}' is not supported by this build")


def _build_api(expert: ExpertConfig, config: AppConfig, pool: ModelPool) -> Backend:
    return _Unavailable("the LiteLLM 'api' backend is not supported by this build")


# One entry per `type` in experts.json; adding a backend is one line here.
BACKEND_BUILDERS: dict[str, Callable[[ExpertConfig, AppConfig, ModelPool], Backend]] = {
    "ollama": _build_ollama,
    "openai": _build_openai,
    "local": _build_local,
    "api": _build_api,
}


def build_backends(config: AppConfig, pool: ModelPool) -> dict[int, Backend]:
    backends: dict[int, Backend] = {}
    for expert in config.experts:
        try:
            backends[expert.id] = BACKEND_BUILDERS[expert.type](expert, config, pool)
        except Exception as exc:  # a broken expert must not stop the others from serving
            log.warning("expert '%s' unavailable at start-up: %s", expert.label, exc)
            backends[expert.id] = _Unavailable(str(exc))
        if isinstance(backends[expert.id], _Unavailable):
            log.warning("expert '%s' will fall back: %s", expert.label, backends[expert.id].reason)  # type: ignore[union-attr]
    return backends

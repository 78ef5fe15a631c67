"""Which backend serves which expert `type`: one builder per type, looked up in a dict.

Adding a backend is one function and one line in `BACKEND_BUILDERS` (local experts go one step
further, by `format`, in `LOCAL_BUILDERS`). An expert whose backend cannot be built (a missing
file, a missing library, an unset API key) does not stop the server: it gets a stand-in that
fails at request time, so the runner answers with the fallback expert, and a start-up warning
says why.

Libraries are imported by the builders, so a server without `api` experts never pays LiteLLM's
import time, and one without ONNX experts never loads onnxruntime.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from modules.backend import Backend
from modules.chat_types import ChatEvent, ChatRequest
from modules.embeddings import EmbeddingBackend, EmbedRequest, EmbedResult
from modules.config_manager import (
    AppConfig,
    ExpertConfig,
    LocalModelsConfig,
    resolve_inside,
    resolve_local_model_path,
)
from modules.errors import ExpertError, ExpertUnavailable, ServiceUnavailable
from modules.logger import get_logger
from modules.model_pool import ModelPool
from modules.model_stats import ModelStats

log = get_logger("backends")


@dataclass
class _Unavailable:
    """Stands in for an expert whose backend could not be built, so it falls back at run time."""

    reason: str
    closed: bool = field(default=False)

    def stream_chat(self, request: ChatRequest) -> Iterator[ChatEvent]:
        raise ExpertUnavailable(self.reason)

    def embed(self, request: EmbedRequest) -> EmbedResult:
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
    assert expert.model_path is not None and expert.format is not None  # guaranteed by config validation
    path = resolve_local_model_path(expert.model_path, config.project_dir, config.local_models.models_dir)
    build = LOCAL_BUILDERS.get(expert.format)
    if build is None:
        return _Unavailable(f"local format '{expert.format}' is not supported by this build")
    return build(expert, path, pool, config.local_models)


def _build_gguf(expert: ExpertConfig, path: Path, pool: ModelPool, local: LocalModelsConfig) -> Backend:
    from modules.ai_engine import GGUFBackend

    return GGUFBackend(expert, path, pool, local)


def _build_onnx(expert: ExpertConfig, path: Path, pool: ModelPool, local: LocalModelsConfig) -> Backend:
    from modules.onnx_runner import GENAI_CONFIG, OnnxBackend

    if not (path / GENAI_CONFIG).is_file():
        # Said at start-up rather than at the first request; the expert falls back meanwhile.
        raise FileNotFoundError(f"ONNX model folder {path} has no {GENAI_CONFIG}")
    return OnnxBackend(expert, path, pool, local)


def _build_api(expert: ExpertConfig, config: AppConfig, pool: ModelPool) -> Backend:
    from modules.litellm_backend import (
        ApiBackend,
        api_key_from_environment,
        import_litellm,
    )

    # Checked first: without its key the expert cannot answer, so LiteLLM need not be imported.
    api_key = api_key_from_environment(expert)
    return ApiBackend(expert, config.server, api_key, import_litellm())


# One entry per local `format`.
LOCAL_BUILDERS: dict[str, Callable[[ExpertConfig, Path, ModelPool, LocalModelsConfig], Backend]] = {
    "gguf": _build_gguf,
    "onnx": _build_onnx,
}


# One entry per `type` in experts.json; adding a backend is one line here.
BACKEND_BUILDERS: dict[str, Callable[[ExpertConfig, AppConfig, ModelPool], Backend]] = {
    "ollama": _build_ollama,
    "openai": _build_openai,
    "local": _build_local,
    "api": _build_api,
}


def is_unavailable(backend: Backend) -> bool:
    """True for the stand-in of an expert whose backend could not be built."""
    return isinstance(backend, _Unavailable)


def build_backends(config: AppConfig, pool: ModelPool) -> dict[int, Backend]:
    if any(e.type == "local" for e in config.experts):
        attach_model_stats(config, pool)
    backends: dict[int, Backend] = {}
    for expert in config.experts:
        backend = _build_or_stand_in(expert, config, pool)
        if isinstance(backend, _Unavailable):
            log.warning("expert '%s' is unavailable and will fall back: %s", expert.label, backend.reason)
        backends[expert.id] = backend
    return backends


def build_embedding_backends(config: AppConfig, pool: ModelPool) -> dict[str, EmbeddingBackend]:
    """A backend per embedding expert, by label, built as a chat expert of its type would be."""
    backends: dict[str, EmbeddingBackend] = {}
    for expert in config.embedding_experts:
        backend = _build_or_stand_in(expert, config, pool)
        if isinstance(backend, _Unavailable):
            log.warning("embedding expert '%s' is unavailable and will fall back: %s", expert.label, backend.reason)
        backends[expert.label] = backend  # type: ignore[assignment]  # the remote types embed too
    return backends


def _build_or_stand_in(expert: ExpertConfig, config: AppConfig, pool: ModelPool) -> Backend:
    try:
        return BACKEND_BUILDERS[expert.type](expert, config, pool)
    except Exception as exc:  # a broken expert must not stop the others from serving
        return _Unavailable(str(exc))


def attach_model_stats(config: AppConfig, pool: ModelPool) -> None:
    """Count the pool's loads, unloads and requests in the stats file (kept from earlier runs)."""
    if pool.stats is not None:
        return
    try:
        path = resolve_inside(config.project_dir, config.local_models.stats_file, "stats_file")
    except ValueError as exc:
        log.warning("model statistics are off: %s", exc)
        return
    pool.attach_stats(ModelStats(path))


@runtime_checkable
class LocalModelBackend(Protocol):
    """A backend with a model in the pool, which Ollama's load/unload requests can steer."""

    def preload(self, keep_alive: float | None = None) -> None: ...

    def unload(self) -> bool: ...


def apply_load_probe(backend: Backend, keep_alive: float | None) -> bool:
    """Ollama's empty load request: keep_alive 0 unloads the expert's model, anything else loads it
    (and sets how long it stays). False when the backend has no local model to steer.

    Raises `ServiceUnavailable` when the model cannot be loaded (or its backend could not even
    be built).
    """
    if isinstance(backend, _Unavailable) and keep_alive != 0:
        raise ServiceUnavailable("the model could not be loaded")
    if not isinstance(backend, LocalModelBackend):
        return False
    if keep_alive == 0:
        backend.unload()
        return True
    try:
        backend.preload(keep_alive)
    except ExpertError as exc:
        log.warning("loading a model on request failed: %s", exc)
        raise ServiceUnavailable("the model could not be loaded") from exc
    return True

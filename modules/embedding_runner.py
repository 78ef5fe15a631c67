"""Which model answers an embedding request, and the fallback when it fails.

The model name picks an embedding expert; `lemoe` and names LeMoE does not serve pick the
default one (`embeddings.default_expert`, else the first embedding expert, else the local
encoder). A chat expert's name is refused: its vectors, if it could make any, would not be
the ones the client indexed with.

The failure rules are chat's (modules/expert_runner.py), with one more condition: vectors of
another model go silently into a client's index only when their length is the one the client
expects (the request's `dimensions`, else the expert's declared `dimensions`) and the local
encoder can give that many. Otherwise the client gets a 503 in its protocol, never vectors of
the wrong size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from modules.config_manager import ROUTER_MODEL_NAME, AppConfig, ExpertConfig
from modules.embeddings import EmbedRequest, EmbedResult, EmbeddingBackend, fit_dimensions
from modules.errors import ExpertError, InvalidRequest, MissingCapability, ServiceUnavailable, UnknownModel
from modules.expert_health import ExpertHealth
from modules.logger import get_logger
from modules.model_catalog import split_tag
from modules.model_pool import ModelPool

log = get_logger("embeddings")


@dataclass(frozen=True)
class EmbeddingTarget:
    """The model chosen for a request: an embedding expert, or the local encoder (expert None)."""

    label: str
    expert: ExpertConfig | None


class EmbeddingRunner:
    def __init__(self, config: AppConfig, backends: dict[str, EmbeddingBackend],
                 local: EmbeddingBackend | None, local_dimensions: int | None,
                 health: ExpertHealth | None = None) -> None:
        self._config = config
        self._backends = backends
        self._local = local
        self._local_dimensions = local_dimensions
        self._local_label = config.embeddings.local_label
        self._health = health or ExpertHealth(config.server.expert_failures_before_cooldown,
                                              config.server.expert_cooldown_seconds)
        self._default = self._default_target()

    @property
    def local_label(self) -> str | None:
        """The local encoder's model name, or None when there is no local encoder."""
        return self._local_label if self._local is not None else None

    @property
    def local_dimensions(self) -> int | None:
        return self._local_dimensions

    def choose(self, name: str | None) -> EmbeddingTarget:
        """The model a request's `model` field picks (see the module docstring)."""
        base, tag = split_tag(name or "")
        if base and tag.lower() == "latest" and base.lower() != ROUTER_MODEL_NAME:
            expert = self._config.embedding_expert_by_label(base)
            if expert is not None:
                return EmbeddingTarget(expert.label, expert)
            if self._local is not None and base.lower() == self._local_label.lower():
                return EmbeddingTarget(self._local_label, None)
            if self._config.expert_by_label(base) is not None:
                raise MissingCapability(f'"{name}" does not support embeddings')
        if self._default is None:
            raise UnknownModel("no embedding model is configured")
        return self._default

    def embed(self, target: EmbeddingTarget, request: EmbedRequest) -> tuple[str, EmbedResult, str | None]:
        """(who answered, vectors, why the fallback answered or None)."""
        if len(request.texts) > self._config.embeddings.max_inputs or (
                request.tokens is not None and len(request.tokens) > self._config.embeddings.max_inputs):
            raise InvalidRequest(f"too many inputs: at most {self._config.embeddings.max_inputs} per request")
        if request.count == 0:
            # Ollama's load request: nothing to embed, and no expert to bother.
            return target.label, EmbedResult(vectors=_empty()), None
        started = time.perf_counter_ns()
        if target.expert is None:
            return target.label, self._run_local(request, request.dimensions, started), None
        expert = target.expert
        cause: str | None = None
        if self._health.is_benched(expert.label):
            cause = "in cool-down"
        else:
            try:
                result = self._backends[expert.label].embed(request)
                self._health.record_success(expert.label)
                return expert.label, _finished(result, request.dimensions, started), None
            except ExpertError as exc:
                cause = f"{type(exc).__name__}: {exc}"
                log.warning("embedding expert '%s' failed: %s", expert.label, cause)
                self._health.record_failure(expert.label, cause)
        return self._local_label, self._fall_back(expert, request, cause, started), cause

    def close(self) -> None:
        for backend in self._backends.values():
            backend.close()

    def _fall_back(self, expert: ExpertConfig, request: EmbedRequest, cause: str, started: int) -> EmbedResult:
        expected = request.dimensions or expert.dimensions
        if self._local is None or expected is None or self._local_dimensions is None \
                or expected > self._local_dimensions:
            log.warning("embedding expert '%s' %s and the local encoder cannot stand in (its %s dimensions, "
                        "%s expected); refusing", expert.label, cause, self._local_dimensions, expected)
            raise ServiceUnavailable("no embedding model that gives vectors of this size is available right now",
                                     retry_after=5)
        log.warning("[Auto-Correction] embedding expert '%s' %s; answering with '%s'",
                    expert.label, cause, self._local_label)
        return self._run_local(request, expected, started)

    def _run_local(self, request: EmbedRequest, dimensions: int | None, started: int) -> EmbedResult:
        assert self._local is not None
        try:
            result = self._local.embed(request)
        except ExpertError as exc:
            log.error("the local encoder failed: %s", exc)
            raise ServiceUnavailable("no embedding model is available to answer right now", retry_after=5) from exc
        return _finished(result, dimensions, started)

    def _default_target(self) -> EmbeddingTarget | None:
        wanted = self._config.embeddings.default_expert
        expert = self._config.embedding_expert_by_label(wanted) if wanted else None
        if expert is None and self._config.embedding_experts:
            expert = self._config.embedding_experts[0]
        if expert is not None:
            return EmbeddingTarget(expert.label, expert)
        if self._local is not None:
            return EmbeddingTarget(self._local_label, None)
        return None


def _finished(result: EmbedResult, dimensions: int | None, started: int) -> EmbedResult:
    return replace(result, vectors=fit_dimensions(result.vectors, dimensions),
                   total_duration_ns=result.total_duration_ns or time.perf_counter_ns() - started)


def _empty() -> np.ndarray:
    return np.zeros((0, 0), dtype=np.float32)


def build_embedding_runner(config: AppConfig, pool: ModelPool) -> EmbeddingRunner:
    """Backends for the embedding experts (built like chat experts' backends) and the local encoder."""
    from modules.backend_registry import build_embedding_backends
    from modules.encoding.local_embeddings import build_local_backend

    local = None
    if config.embeddings.local_model:
        try:
            local = build_local_backend(config.embeddings.local_model, config.embeddings.local_label,
                                        config.embeddings.max_input_chars)
        except Exception as exc:  # chat must keep serving without the local encoder
            log.warning("the local encoder '%s' is unavailable: %s", config.embeddings.local_model, exc)
    return EmbeddingRunner(config, build_embedding_backends(config, pool), local,
                           local.dimensions if local is not None else None)

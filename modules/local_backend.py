"""What every local (in-process) expert shares, whatever engine runs the model.

A local model is expensive to load and not safe to run twice at once, so a local backend never
owns it: it borrows it from the `ModelPool` for exactly as long as one answer takes, and holds
the model's own lock meanwhile. That lease-then-lock sequence, Ollama's load and unload probes,
and the translation of an engine's exceptions into `ExpertError`s are written once here;
`ai_engine.GGUFBackend` (llama-cpp) and `onnx_runner.OnnxBackend` (onnxruntime-genai) add only
what differs between engines: how a model is loaded, how a request becomes the engine's
settings, and how tokens are generated.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from modules.chat_types import ChatEvent, ChatRequest, Done
from modules.config_manager import ExpertConfig, LocalModelsConfig
from modules.errors import ExpertError, ExpertUnavailable
from modules.model_pool import ModelPool


class PooledModel(Protocol):
    """What the pool keeps for one local model: at least the lock that serialises its answers."""

    @property
    def lock(self) -> threading.Lock: ...


ModelT = TypeVar("ModelT", bound=PooledModel)
PlanT = TypeVar("PlanT")


@contextmanager
def map_library_errors(
    errors: tuple[type[BaseException], ...], failure: type[ExpertError], what: str
) -> Iterator[None]:
    """Re-raise one of an engine's `errors` as `failure`; the message is for the log only.

    Anything else is a bug of ours and propagates as it is, so the runner logs its traceback.
    """
    try:
        yield
    except errors as exc:
        raise failure(f"{what}: {type(exc).__name__}: {exc}") from exc


class PooledLocalBackend(ABC, Generic[ModelT, PlanT]):
    """A `Backend` answering with a model file or folder under models/, borrowed from the pool.

    The pool key is the resolved path, so experts naming the same model share one copy.
    """

    # What the engine raises on bad files, bad prompts or failed runs.
    library_errors: tuple[type[BaseException], ...] = ()

    def __init__(self, expert: ExpertConfig, model_path: Path, pool: ModelPool, local: LocalModelsConfig) -> None:
        self.expert = expert
        self.model_path = model_path.resolve()
        self.pool_key = str(self.model_path)
        self._pool = pool
        self._local = local

    def stream_chat(self, request: ChatRequest) -> Iterator[ChatEvent]:
        started = time.perf_counter_ns()
        # Before the lease: what cannot be answered must not cost a model load.
        plan = self._plan(request)
        with ExitStack() as stack:
            with self._map_errors(ExpertUnavailable, f"loading {self.pool_key}"):
                # The lease is held until the stream ends, so the pool never unloads the model
                # under a running answer; closing this generator releases it.
                model = stack.enter_context(self._pool.lease(self.pool_key, self._load, request.keep_alive))
            load_ns = time.perf_counter_ns() - started
            stack.enter_context(model.lock)
            for event in self._generate(model, request, plan, started, load_ns):
                if isinstance(event, Done):
                    self._pool.record_request(self.pool_key, event.usage.prompt_tokens, event.usage.completion_tokens)
                yield event

    def preload(self, keep_alive: float | None = None) -> None:
        """Load the model without generating (Ollama's empty-prompt "load" request)."""
        with self._map_errors(ExpertUnavailable, f"loading {self.pool_key}"):
            with self._pool.lease(self.pool_key, self._load, keep_alive):
                pass

    def unload(self) -> bool:
        """Unload the model now, or when its running answers end (Ollama's keep_alive 0 probe)."""
        return self._pool.unload(self.pool_key)

    def close(self) -> None:
        # The pool owns the models, and other experts may share this one.
        pass

    def _map_errors(self, failure: type[ExpertError], what: str) -> AbstractContextManager[None]:
        return map_library_errors(self.library_errors, failure, what)

    @abstractmethod
    def _load(self) -> ModelT:
        """Load the model (raising the engine's own exceptions, which the lease maps)."""

    @abstractmethod
    def _plan(self, request: ChatRequest) -> PlanT:
        """The engine's generation settings for `request`, computed before any load."""

    @abstractmethod
    def _generate(
        self, model: ModelT, request: ChatRequest, plan: PlanT, started_ns: int, load_ns: int
    ) -> Iterator[ChatEvent]:
        """Stream one answer, ending with `Done`, from a model whose lock the caller holds."""

"""The one internal shape of an embedding request and its answer, shared by both APIs.

`/api/embed`, `/api/embeddings` and `/v1/embeddings` parse into an `EmbedRequest`
(modules/protocol/embedding_protocol.py); an embedding backend (a remote expert, or the local encoder)
turns it into an `EmbedResult`; the protocol layer writes that back in the client's shape.
Nothing here knows HTTP or either protocol's field names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class EmbedRequest:
    """An embedding request after parsing, whatever protocol it came in."""

    # Model name as the client sent it (None or "lemoe": the default embedding model).
    model: str | None
    # The texts to embed, in the order the vectors must come back in.
    texts: list[str]
    # OpenAI's pre-tokenised input (lists of token ids), sent instead of `texts`; only an
    # OpenAI-compatible expert can read it, since token ids mean nothing to another tokenizer.
    tokens: list[list[int]] | None = None
    # Cut inputs longer than the model takes (True, Ollama's default), or refuse them.
    truncate: bool = True
    # Keep only the first n dimensions of each vector (then re-normalise, as Ollama does).
    dimensions: int | None = None
    # Ollama's keep_alive in seconds and model options, passed on to an Ollama expert.
    keep_alive: float | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.tokens) if self.tokens is not None else len(self.texts)


@dataclass(frozen=True)
class EmbedResult:
    """Vectors, one row per input in input order (float32), and what they cost."""

    vectors: np.ndarray
    prompt_tokens: int = 0
    total_duration_ns: int = 0
    load_duration_ns: int = 0


class EmbeddingBackend(Protocol):
    def embed(self, request: EmbedRequest) -> EmbedResult:
        """Vectors for `request`, in input order.

        Raises `ExpertError` when the expert fails (the runner may fall back), or a
        `RequestError` when the request itself cannot be served by this model.
        """
        ...

    def close(self) -> None: ...


def fit_dimensions(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """The first `dimensions` columns, re-normalised to unit length (Ollama's `dimensions`).

    Vectors already no longer than `dimensions` are returned as they are: Ollama does not pad.
    """
    if dimensions is None or vectors.ndim != 2 or vectors.shape[1] <= dimensions:
        return vectors
    cut = np.asarray(vectors[:, :dimensions], dtype=np.float32)
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    fitted: np.ndarray = cut / np.maximum(norms, 1e-12)
    return fitted

"""Embeddings from the local encoder (by default the packaged multilingual USE the router uses).

This is what answers `/api/embed` and `/v1/embeddings` out of the box, offline, with no other
server, and what stands in when an embedding expert fails. It shares the router's loaded model
(`build_document_encoder`), so serving embeddings costs no second copy of the weights.
"""

from __future__ import annotations

import math
import time

from modules.blocking import run_blocking
from modules.capabilities import CHARS_PER_TOKEN
from modules.embeddings import EmbedRequest, EmbedResult
from modules.encoding.encoders import Encoder, build_document_encoder
from modules.errors import ExpertUnavailable, InvalidRequest

# Texts up to this many characters in all are encoded inline: a short query costs the packaged
# encoder well under a millisecond, about what the trip to another thread would cost. Longer
# batches (a document's chunks) run on a real thread so the worker's other requests go on.
_INLINE_CHARS = 512


class LocalEncoderBackend:
    """An `EmbeddingBackend` over an in-process `Encoder`."""

    def __init__(self, encoder: Encoder, label: str, max_chars: int) -> None:
        self._encoder = encoder
        self._label = label
        self._max_chars = max_chars
        # Known up front, so the runner can tell whether this encoder may stand in for an expert.
        self.dimensions = int(encoder.encode_passages(["dimensions"]).shape[1])

    def embed(self, request: EmbedRequest) -> EmbedResult:
        if request.tokens is not None:
            raise InvalidRequest(f"model '{self._label}' takes text, not token arrays")
        texts = [self._fitted(text, request.truncate) for text in request.texts]
        started = time.perf_counter_ns()
        try:
            if sum(len(text) for text in texts) <= _INLINE_CHARS:
                vectors = self._encoder.encode_passages(texts)
            else:
                vectors = run_blocking(self._encoder.encode_passages, texts)
        except Exception as exc:  # the encoder's own failure is an expert failure, not a 500
            raise ExpertUnavailable(f"local encoder failed ({type(exc).__name__})") from exc
        # No tokenizer is run: tokens are estimated the way capabilities.py estimates prompts.
        tokens = sum(math.ceil(len(text) / CHARS_PER_TOKEN) for text in texts)
        return EmbedResult(vectors=vectors, prompt_tokens=tokens, total_duration_ns=time.perf_counter_ns() - started)

    def close(self) -> None:
        # The model is shared with the router and cached per process; nothing of ours to free.
        pass

    def _fitted(self, text: str, truncate: bool) -> str:
        if len(text) <= self._max_chars:
            return text
        if not truncate:
            raise InvalidRequest(f"input length exceeds the context length of model '{self._label}' "
                                 f"({self._max_chars} characters)")
        # Ollama truncates the end of an input and keeps its beginning.
        return text[: self._max_chars]


def build_local_backend(model_path: str, label: str, max_chars: int) -> LocalEncoderBackend | None:
    encoder = build_document_encoder(model_path, max_chars)
    return LocalEncoderBackend(encoder, label, max_chars) if encoder is not None else None

"""Concurrent queries share encoder passes, and each caller still gets its own vectors."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np

from modules.encoding.encode_batching import SharedPassEncoder
from modules.encoding.encoders import PACKAGED_ENCODER, build_encoder


class SlowEncoder:
    """Encodes a text as a vector holding its length, slowly, and records each call's size."""

    name = "slow"

    def __init__(self, delay: float = 0.05, fail_on: str | None = None) -> None:
        self.delay = delay
        self.fail_on = fail_on
        self.calls: list[int] = []
        self.passages: list[int] = []
        self._lock = threading.Lock()

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            self.calls.append(len(texts))
        time.sleep(self.delay)
        if self.fail_on is not None and self.fail_on in texts:
            raise RuntimeError("encoder broke")
        return np.array([[len(t), i] for i, t in enumerate(texts)], dtype=np.float32)

    def encode_passages(self, texts: Sequence[str]) -> np.ndarray:
        self.passages.append(len(texts))
        return np.zeros((len(texts), 2), dtype=np.float32)


def run_concurrently(encoder: SharedPassEncoder, inputs: list[list[str]]) -> list[object]:
    results: list[object] = [None] * len(inputs)
    start = threading.Barrier(len(inputs))

    def call(i: int) -> None:
        start.wait()
        try:
            results[i] = encoder.encode_queries(inputs[i])
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not any(t.is_alive() for t in threads), "a caller never got its vectors"
    return results


def test_a_lone_query_is_encoded_at_once() -> None:
    inner = SlowEncoder(delay=0)
    encoder = SharedPassEncoder(inner)
    vectors = encoder.encode_queries(["abc"])
    assert inner.calls == [1]
    assert vectors.tolist() == [[3, 0]]
    assert encoder.name == "slow"


def test_concurrent_queries_share_passes_and_get_their_own_rows() -> None:
    inner = SlowEncoder(delay=0.05)
    encoder = SharedPassEncoder(inner, max_batch=16)
    inputs = [["x" * (i + 1)] for i in range(12)]
    results = run_concurrently(encoder, inputs)
    for i, result in enumerate(results):
        assert isinstance(result, np.ndarray)
        assert result.shape == (1, 2)
        assert result[0, 0] == i + 1  # the row of this caller's own text
    assert sum(inner.calls) == 12
    # The first caller runs alone; the others queue behind it and go in far fewer passes.
    assert len(inner.calls) < 12
    assert max(inner.calls) > 1


def test_a_caller_with_several_texts_gets_them_in_order() -> None:
    inner = SlowEncoder(delay=0.02)
    encoder = SharedPassEncoder(inner, max_batch=8)
    inputs = [["a", "bb", "ccc"], ["dddd"], ["eeeee", "ffffff"], ["g"] * 3]
    results = run_concurrently(encoder, inputs)
    for texts, result in zip(inputs, results):
        assert isinstance(result, np.ndarray)
        assert result[:, 0].tolist() == [len(t) for t in texts]


def test_batches_never_exceed_the_cap() -> None:
    inner = SlowEncoder(delay=0.02)
    encoder = SharedPassEncoder(inner, max_batch=4)
    results = run_concurrently(encoder, [["t"] for _ in range(20)])
    assert all(isinstance(r, np.ndarray) for r in results)
    assert max(inner.calls) <= 4
    assert sum(inner.calls) == 20


def test_large_calls_skip_the_queue() -> None:
    inner = SlowEncoder(delay=0)
    encoder = SharedPassEncoder(inner, max_batch=4)
    assert encoder.encode_queries(["q"] * 50).shape == (50, 2)
    assert inner.calls == [50]


def test_an_encoder_error_reaches_every_caller_of_that_pass_and_the_next_pass_works() -> None:
    inner = SlowEncoder(delay=0.05, fail_on="boom")
    encoder = SharedPassEncoder(inner, max_batch=16)
    results = run_concurrently(encoder, [["boom"]] + [["ok"] for _ in range(5)])
    assert isinstance(results[0], RuntimeError)
    # Whoever shared the failed pass sees the error; nobody hangs; later calls work again.
    assert all(isinstance(r, (np.ndarray, RuntimeError)) for r in results)
    assert encoder.encode_queries(["fine"]).tolist() == [[4, 0]]


def test_passages_go_straight_through() -> None:
    inner = SlowEncoder(delay=0)
    encoder = SharedPassEncoder(inner)
    assert encoder.encode_passages(["a", "b"]).shape == (2, 2)
    assert inner.passages == [2] and inner.calls == []


def test_packaged_encoder_batched_vectors_match_one_by_one() -> None:
    shared = build_encoder(PACKAGED_ENCODER)
    assert isinstance(shared, SharedPassEncoder)
    texts = [
        "write a python function that adds two numbers",
        "traduce esto al inglés: buenos días",
        "how do I open port 22 in the firewall?",
        "a short poem about the sea",
        "¿qué hora es?",
        "x",
        "the quick brown fox " * 20,
        "bonjour",
    ]
    alone = np.vstack([shared.inner.encode_queries([t]) for t in texts])
    results = run_concurrently(shared, [[t] for t in texts])
    together = np.vstack([r for r in results if isinstance(r, np.ndarray)])
    assert together.shape == alone.shape
    np.testing.assert_allclose(together, alone, atol=2e-5)

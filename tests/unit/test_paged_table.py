"""The token table read from a file on demand: same rows as in memory, and safe fallbacks."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from modules.encoding.encoders import map_embedding_table
from modules.encoding.paged_table import PagedTable


@pytest.fixture()
def table() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, size=(1000, 24), dtype=np.uint8)


def test_rows_match_numpy_indexing(table: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "t.npy"
    np.save(path, table)
    paged = PagedTable(path)
    ids = np.array([5, 999, 0, 5, 17, 17, 500], dtype=np.int64)
    assert paged.shape == table.shape and paged.dtype == table.dtype
    np.testing.assert_array_equal(paged[ids], table[ids])
    assert paged[np.array([], dtype=np.int64)].shape == (0, 24)


def test_float_rows_too(tmp_path: Path) -> None:
    table = np.arange(60, dtype=np.float32).reshape(20, 3)
    np.save(tmp_path / "f.npy", table)
    ids = np.array([19, 0, 3])
    np.testing.assert_array_equal(PagedTable(tmp_path / "f.npy")[ids], table[ids])


def test_out_of_range_and_bad_index(table: np.ndarray, tmp_path: Path) -> None:
    np.save(tmp_path / "t.npy", table)
    paged = PagedTable(tmp_path / "t.npy")
    with pytest.raises(IndexError):
        paged[np.array([1000])]
    with pytest.raises(IndexError):
        paged[np.array([-1])]
    with pytest.raises(TypeError):
        paged[np.array([[1, 2]])]


def test_a_cut_file_is_refused(table: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "t.npy"
    np.save(path, table)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError):
        PagedTable(path)


def test_backend_table_moves_to_the_file_and_reads_the_same(table: np.ndarray, tmp_path: Path) -> None:
    backend = SimpleNamespace(table=table.copy())
    path = tmp_path / "cache" / "table.npy"
    assert map_embedding_table(backend, path)
    assert isinstance(backend.table, PagedTable)
    assert path.is_file()
    ids = np.array([3, 3, 998, 42])
    np.testing.assert_array_equal(backend.table[ids], table[ids])


def test_an_altered_cache_file_is_rewritten(table: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "table.npy"
    np.save(path, np.zeros_like(table))
    backend = SimpleNamespace(table=table.copy())
    assert map_embedding_table(backend, path)
    np.testing.assert_array_equal(np.load(path), table)


def test_an_unwritable_cache_keeps_the_table_in_memory(table: np.ndarray, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    backend = SimpleNamespace(table=table)
    assert not map_embedding_table(backend, blocker / "table.npy")
    assert backend.table is table

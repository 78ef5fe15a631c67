"""Load and usage statistics of local models, kept in one JSON file that survives restarts.

Per model (keyed like the pool: the model file's resolved path) the file holds how often it was
loaded and unloaded, how many requests it answered, how many tokens it read and wrote, the
seconds spent loading it, and when it was last used (epoch seconds)::

    {"version": 1, "models": {"/…/models/a.gguf": {"loads": 2, "unloads": 1, "requests": 7, …}}}

Every write is atomic (a temporary file in the same folder, fsync, `os.replace`): a crash or a
`kill -9` in the middle of a write leaves either the old file or the new one, never half of one.

Several gunicorn workers share the file. Each process counts what happened since its last write
and adds it to whatever the file holds at write time, under an advisory lock (`fcntl.flock` on a
`.lock` file beside it), so no worker overwrites another's counts.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from modules.logger import get_logger

_log = get_logger("model_stats")
FORMAT_VERSION = 1


@dataclass
class ModelCounts:
    """What is known about one model; also used for the not-yet-written changes of a process."""

    loads: int = 0
    unloads: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    load_seconds: float = 0.0
    # Epoch seconds; 0 = never.
    last_used: float = 0.0

    def add(self, other: ModelCounts) -> None:
        for f in fields(self):
            if f.name == "last_used":
                self.last_used = max(self.last_used, other.last_used)
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace `path` with `data` as JSON so that readers only ever see a complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as tmp:
            json.dump(data, tmp, indent=1, sort_keys=True)
            tmp.flush()
            # The data must be on disk before the rename makes it the file, or a power cut
            # could leave the new name pointing at empty blocks.
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with _ignoring(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself durable; some filesystems refuse fsync on a folder, which is fine.
    with _ignoring(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def _ignoring(*kinds: type[BaseException]) -> Iterator[None]:
    try:
        yield
    except kinds:
        pass


def read_stats_file(path: Path) -> dict[str, ModelCounts]:
    """The counts stored in `path`; an absent file is empty, a damaged one is set aside."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return counts_from_json(raw)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        # Keep the bad file for a human to look at, and start counting again.
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        _log.warning("model stats file %s is unreadable (%s); moved it to %s", path, exc, aside.name)
        with _ignoring(OSError):
            os.replace(path, aside)
        return {}


def counts_from_json(raw: Mapping[str, Any]) -> dict[str, ModelCounts]:
    known = {f.name for f in fields(ModelCounts)}
    models = raw.get("models") or {}
    return {
        key: ModelCounts(**{k: v for k, v in entry.items() if k in known})
        for key, entry in models.items()
    }


def json_from_counts(counts: Mapping[str, ModelCounts]) -> dict[str, Any]:
    return {"version": FORMAT_VERSION, "models": {key: asdict(c) for key, c in sorted(counts.items())}}


class ModelStats:
    """Thread-safe counters for local models, written to `path` after every change."""

    def __init__(self, path: Path, wall_clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = wall_clock
        self._lock = threading.Lock()
        # What this process counted and has not written yet (normally empty between calls).
        self._pending: dict[str, ModelCounts] = {}
        # The file as last read or written, so `snapshot` needs no disk access.
        self._known = read_stats_file(path)

    def record_load(self, key: str, seconds: float) -> None:
        self._record(key, ModelCounts(loads=1, load_seconds=seconds, last_used=self._clock()))

    def record_unload(self, key: str) -> None:
        self._record(key, ModelCounts(unloads=1))

    def record_request(self, key: str, prompt_tokens: int, completion_tokens: int) -> None:
        self._record(key, ModelCounts(requests=1, prompt_tokens=prompt_tokens,
                                      completion_tokens=completion_tokens, last_used=self._clock()))

    def snapshot(self) -> dict[str, ModelCounts]:
        """Everything known: the file as last seen plus this process's unwritten counts."""
        with self._lock:
            merged = {k: ModelCounts(**asdict(v)) for k, v in self._known.items()}
            for key, delta in self._pending.items():
                merged.setdefault(key, ModelCounts()).add(delta)
            return merged

    def flush(self) -> None:
        """Add this process's counts to the file (atomically, under the cross-process lock)."""
        with self._lock:
            if not self._pending:
                return
            pending, self._pending = self._pending, {}
        try:
            self._known = self._merge_into_file(pending)
        except OSError:
            _log.exception("writing model stats to %s failed; will retry on the next change", self.path)
            with self._lock:
                for key, delta in pending.items():
                    self._pending.setdefault(key, ModelCounts()).add(delta)

    def _record(self, key: str, delta: ModelCounts) -> None:
        with self._lock:
            self._pending.setdefault(key, ModelCounts()).add(delta)
        self.flush()

    def _merge_into_file(self, pending: Mapping[str, ModelCounts]) -> dict[str, ModelCounts]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            current = read_stats_file(self.path)
            for key, delta in pending.items():
                current.setdefault(key, ModelCounts()).add(delta)
            write_json_atomic(self.path, json_from_counts(current))
            return current

"""Keep local models in memory between requests, within a count limit and an idle time limit.

A backend borrows a model with `with pool.lease(key, loader) as model:`. The pool loads it on
first use (once, however many threads ask at the same moment), counts who is using it, and
unloads it later:

- when more than `max_loaded` models are loaded, the least recently used idle model goes first;
- when a model has been idle longer than its time to live (`evict_expired`, run by the reaper).

A model that is in use is never unloaded. If every loaded model is in use when another one is
needed, the new model is loaded anyway and the pool holds more than `max_loaded` for a while:
refusing or queueing the request would turn a memory limit into an outage, and the pool
shrinks back to the limit as soon as leases end.

The pool knows nothing about GGUF or ONNX: a model is any object. Unloading calls the pool's
`unloader(model)` if one was given, else `model.close()` when the model has one, then drops
the reference.

With a `ModelStats` attached, every load and unload is counted there, and backends report each
answered request through `record_request`; the counts persist across restarts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from modules.logger import get_logger
from modules.model_stats import ModelStats

T = TypeVar("T")

_log = get_logger("model_pool")


@dataclass(frozen=True)
class LoadedModel:
    """A snapshot of one pooled model, for /api/ps and the logs (times are epoch seconds)."""

    key: str
    loaded_at: float
    last_used: float
    # When the model will be unloaded if nobody uses it again; None means never.
    expires_at: float | None
    # Leases open right now.
    in_use: int
    size_bytes: int | None


@dataclass(eq=False)
class _Entry:
    key: str
    # Resolves to the model once loaded; concurrent lessees wait on it instead of loading again.
    future: Future[Any] = field(default_factory=Future)
    in_use: int = 0
    # On the pool's (monotonic) clock.
    last_used: float = 0.0
    loaded_at_wall: float = 0.0
    # Seconds of idleness before unloading: 0 = at once, negative = never.
    ttl: float = 0.0
    size_bytes: int | None = None

    @property
    def ready(self) -> bool:
        return self.future.done() and self.future.exception() is None


def _size_attribute(model: Any) -> int | None:
    size = getattr(model, "size_bytes", None)
    return size if isinstance(size, int) else None


class ModelPool:
    """A thread-safe cache of loaded models keyed by a string (e.g. the model file's path)."""

    def __init__(
        self,
        max_loaded: int,
        ttl_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        wall_clock: Callable[[], float] = time.time,
        unloader: Callable[[Any], None] | None = None,
        size_of: Callable[[Any], int | None] = _size_attribute,
        stats: ModelStats | None = None,
    ) -> None:
        if max_loaded < 1:
            raise ValueError("max_loaded must be at least 1")
        self.max_loaded = max_loaded
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._wall_clock = wall_clock
        self._unloader = unloader
        self._size_of = size_of
        self.stats = stats
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._closed = False
        self._reaper: threading.Thread | None = None
        self._reaper_stop = threading.Event()

    @contextmanager
    def lease(self, key: str, loader: Callable[[], T], keep_alive: float | None = None) -> Iterator[T]:
        """Borrow the model under `key`, loading it with `loader()` if it is not loaded.

        `keep_alive` overrides the pool's time to live for this model from now on (seconds;
        0 unloads it as soon as the last lease ends, negative keeps it until `close()`).
        A loader exception propagates to every thread that was waiting for that load.
        """
        entry = self._acquire(key, loader, keep_alive)
        try:
            yield entry.future.result()
        finally:
            self._release(entry, keep_alive)

    def attach_stats(self, stats: ModelStats) -> None:
        """Count loads, unloads and requests in `stats` from now on."""
        self.stats = stats

    def record_request(self, key: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Count one answered request on the model under `key` (a no-op without stats)."""
        if self.stats is not None:
            self.stats.record_request(key, prompt_tokens, completion_tokens)

    def loaded(self) -> list[LoadedModel]:
        """Models that are fully loaded, most recently used first."""
        with self._lock:
            now, wall = self._clock(), self._wall_clock()
            entries = sorted((e for e in self._entries.values() if e.ready), key=lambda e: e.last_used, reverse=True)
            return [self._describe(e, now, wall) for e in entries]

    def evict_expired(self) -> list[str]:
        """Unload every idle model whose time to live has passed; return their keys."""
        with self._lock:
            now = self._clock()
            victims = [e for e in self._entries.values() if self._is_expired(e, now)]
            for victim in victims:
                del self._entries[victim.key]
        self._unload(victims)
        return [v.key for v in victims]

    def unload(self, key: str) -> bool:
        """Unload `key` now if idle, else as soon as its last lease ends. True if it was loaded."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            entry.ttl = 0
            idle = entry.in_use == 0 and entry.ready
            if idle:
                del self._entries[key]
        if idle:
            self._unload([entry])
        return True

    def start_reaper(self, interval: float) -> None:
        """Run `evict_expired` every `interval` seconds in a daemon thread (idempotent)."""
        with self._lock:
            if self._reaper is not None and self._reaper.is_alive():
                return
            self._reaper_stop.clear()
            self._reaper = threading.Thread(target=self._reap, args=(interval,), name="model-pool-reaper", daemon=True)
            self._reaper.start()

    def stop_reaper(self, timeout: float | None = 5.0) -> None:
        self._reaper_stop.set()
        reaper = self._reaper
        if reaper is not None and reaper is not threading.current_thread():
            reaper.join(timeout)
        self._reaper = None

    def close(self) -> None:
        """Stop the reaper and unload every idle model; models in use go when their lease ends."""
        self.stop_reaper()
        with self._lock:
            self._closed = True
            victims = [e for e in self._entries.values() if e.in_use == 0]
            for victim in victims:
                del self._entries[victim.key]
        self._unload(victims)

    def _acquire(self, key: str, loader: Callable[[], Any], keep_alive: float | None) -> _Entry:
        victims: list[_Entry] = []
        with self._lock:
            entry = self._entries.get(key)
            must_load = entry is None
            if entry is None:
                entry = _Entry(key=key, ttl=self.ttl_seconds)
                self._entries[key] = entry
                # Make room before loading, so peak memory stays near the limit.
                victims = self._take_lru_victims()
            entry.in_use += 1
            entry.last_used = self._clock()
            if keep_alive is not None:
                entry.ttl = keep_alive
        self._unload(victims)
        if must_load:
            self._load(entry, loader)
        return entry

    def _load(self, entry: _Entry, loader: Callable[[], Any]) -> None:
        started = time.perf_counter()
        try:
            model = loader()
        except BaseException as exc:
            with self._lock:
                if self._entries.get(entry.key) is entry:
                    del self._entries[entry.key]
            # Waiters re-raise the same exception from `future.result()`, as concurrent.futures does.
            entry.future.set_exception(exc)
            return
        size = self._measure(entry.key, model)
        with self._lock:
            entry.size_bytes = size
            entry.loaded_at_wall = self._wall_clock()
            entry.last_used = self._clock()
        entry.future.set_result(model)
        seconds = time.perf_counter() - started
        _log.info("loaded model %s in %.2fs", entry.key, seconds)
        if self.stats is not None:
            self.stats.record_load(entry.key, seconds)

    def _measure(self, key: str, model: Any) -> int | None:
        try:
            return self._size_of(model)
        except Exception:
            # A size is only reported, never needed: a loaded model must not be lost over it.
            _log.exception("measuring model %s failed", key)
            return None

    def _release(self, entry: _Entry, keep_alive: float | None) -> None:
        victims: list[_Entry] = []
        with self._lock:
            entry.in_use -= 1
            if self._entries.get(entry.key) is not entry:
                return  # its load failed: nothing to keep or unload
            entry.last_used = self._clock()
            if keep_alive is not None:
                entry.ttl = keep_alive
            if entry.in_use == 0 and (entry.ttl == 0 or self._closed):
                del self._entries[entry.key]
                victims.append(entry)
            victims.extend(self._take_lru_victims())
        self._unload(victims)

    def _take_lru_victims(self) -> list[_Entry]:
        """Remove idle entries, least recently used first, until the pool fits its limit."""
        excess = len(self._entries) - self.max_loaded
        if excess <= 0:
            return []
        idle = sorted((e for e in self._entries.values() if e.in_use == 0 and e.ready), key=lambda e: e.last_used)
        victims = idle[:excess]
        for victim in victims:
            del self._entries[victim.key]
        return victims

    def _is_expired(self, entry: _Entry, now: float) -> bool:
        if entry.in_use or not entry.ready or entry.ttl < 0:
            return False
        return now - entry.last_used >= entry.ttl

    def _describe(self, entry: _Entry, now: float, wall: float) -> LoadedModel:
        # Convert monotonic times to epoch through "how long ago", so a wall-clock jump
        # changes only what is reported, never when a model is unloaded.
        last_used = wall - (now - entry.last_used)
        return LoadedModel(
            key=entry.key,
            loaded_at=entry.loaded_at_wall,
            last_used=last_used,
            expires_at=None if entry.ttl < 0 else last_used + entry.ttl,
            in_use=entry.in_use,
            size_bytes=entry.size_bytes,
        )

    def _unload(self, victims: list[_Entry]) -> None:
        # Runs outside the pool lock: freeing a large model can take a while.
        for victim in victims:
            model = victim.future.result()
            try:
                if self._unloader is not None:
                    self._unloader(model)
                elif callable(getattr(model, "close", None)):
                    model.close()
            except Exception:
                _log.exception("unloading model %s failed", victim.key)
            _log.info("unloaded model %s", victim.key)
            if self.stats is not None:
                self.stats.record_unload(victim.key)

    def _reap(self, interval: float) -> None:
        while not self._reaper_stop.wait(interval):
            try:
                self.evict_expired()
            except Exception:
                # The reaper must outlive one bad unload; the next round tries again.
                _log.exception("model reaper round failed")

"""Concurrent routing requests share one encoder pass.

A short query costs the packaged encoder about 1.5 ms of CPU, and most of that is streaming
~13 MB of weights through the cache, not arithmetic on the query's dozen tokens: eight queries
in one pass cost about 650 µs each. Under load many requests wait to be routed at the same
moment, so whoever finds the encoder idle encodes every query waiting at that point in one
call. With one request in flight nothing waits, and its query is encoded at once as before.

No thread of its own: the caller that runs a batch is always one whose query is in it, so
there is nothing to start, stop or leak across hot reloads and gunicorn forks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from modules.blocking import native_lock

if TYPE_CHECKING:
    from modules.encoding.encoders import Encoder

# Queries per shared pass. The packaged encoder's per-query cost flattens out by about eight
# queries; a cap keeps one unlucky runner from encoding a whole queue of long texts.
DEFAULT_MAX_BATCH = 16


class _Wake:
    """A one-shot event on the OS's locks: callers run on gevent's pool threads under the server
    (modules/blocking.py), where gevent's own Event cannot be waited on."""

    def __init__(self) -> None:
        self._lock = native_lock()
        self._lock.acquire()

    def set(self) -> None:
        try:
            self._lock.release()
        except RuntimeError:  # set already
            pass

    def wait(self) -> None:
        self._lock.acquire()
        self._lock.release()


@dataclass
class _Job:
    texts: list[str]
    wake: _Wake = field(default_factory=_Wake)
    vectors: np.ndarray | None = None
    error: BaseException | None = None
    done: bool = False


class SharedPassEncoder:
    """An `Encoder` whose `encode_queries` calls from concurrent threads are batched.

    Passages (the experts' keywords and descriptions) are encoded once at start-up and go
    straight through. A call with more texts than `max_batch` (an evaluation run) is not
    batched with anything: it already amortises the weights on its own.

    Each waiting caller sleeps on an event of its own, woken either because its vectors are
    ready or because it is handed the encoder to run the next batch. (One shared condition
    variable woke every waiter on every pass; under load that cost a third of the GIL.)
    """

    def __init__(self, inner: Encoder, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        self._inner = inner
        self._max_batch = max(1, max_batch)
        self.name = inner.name
        self._lock = native_lock()
        self._queue: list[_Job] = []
        self._busy = False

    @property
    def inner(self) -> Encoder:
        return self._inner

    def encode_passages(self, texts: Sequence[str]) -> np.ndarray:
        return self._inner.encode_passages(texts)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts or len(texts) > self._max_batch:
            return self._inner.encode_queries(texts)
        job = _Job(texts)
        with self._lock:
            self._queue.append(job)
            leads = not self._busy
            self._busy = True
        if not leads:
            job.wake.wait()
        while not job.done:
            # This thread holds the encoder: run what is waiting, then keep the encoder while
            # its own job is still queued (older jobs filled the batch), else pass it on.
            with self._lock:
                batch = self._take_batch()
            self._run(batch)
            with self._lock:
                if job.done and self._queue:
                    self._queue[0].wake.set()
                elif job.done:
                    self._busy = False
        return self._result(job)

    def _take_batch(self) -> list[_Job]:
        # Jobs go in arrival order, so the caller's job is in the batch unless older jobs
        # fill it.
        batch: list[_Job] = []
        count = 0
        while self._queue and (not batch or count + len(self._queue[0].texts) <= self._max_batch):
            job = self._queue.pop(0)
            batch.append(job)
            count += len(job.texts)
        return batch

    def _run(self, batch: list[_Job]) -> None:
        texts = [t for job in batch for t in job.texts]
        try:
            vectors = self._inner.encode_queries(texts)
        except BaseException as exc:  # noqa: BLE001 - each waiting request re-raises it as its own
            for job in batch:
                job.error = exc
        else:
            start = 0
            for job in batch:
                job.vectors = vectors[start : start + len(job.texts)]
                start += len(job.texts)
        for job in batch:
            job.done = True
            job.wake.set()

    def _result(self, job: _Job) -> np.ndarray:
        if job.error is not None:
            raise job.error
        assert job.vectors is not None
        return job.vectors

"""Which experts are failing: consecutive-failure counts and the cool-down that benches an expert.

An expert that fails `failures_before_cooldown` times in a row is benched for `cooldown_seconds`:
the runner sends its requests straight to the fallback expert instead of making every client wait
for the same timeout. When the cool-down ends the expert gets requests again; one more failure
benches it again at once (it has not answered since), one success clears its record.

The record lives in memory, so each gunicorn worker process keeps its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from modules.logger import get_logger, sanitize

log = get_logger("health")


@dataclass
class _Record:
    failures: int = 0
    benched_until: float | None = None


class ExpertHealth:
    """Thread-safe failure bookkeeping, keyed by expert label."""

    def __init__(self, failures_before_cooldown: int, cooldown_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._threshold = max(1, failures_before_cooldown)
        self._cooldown = cooldown_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._records: dict[str, _Record] = {}

    def is_benched(self, label: str) -> bool:
        """True while `label` is in its cool-down; logs the moment a cool-down is over."""
        with self._lock:
            record = self._records.get(label)
            if record is None or record.benched_until is None:
                return False
            if self._clock() < record.benched_until:
                return True
            record.benched_until = None
        log.info("expert '%s' cool-down is over: sending it requests again", label)
        return False

    def record_failure(self, label: str, cause: str) -> None:
        with self._lock:
            record = self._records.setdefault(label, _Record())
            record.failures += 1
            if self._cooldown <= 0 or record.failures < self._threshold or record.benched_until is not None:
                return
            record.benched_until = self._clock() + self._cooldown
            failures = record.failures
        log.warning("expert '%s' benched for %gs after %d failures in a row (last: %s); "
                    "its requests go to the fallback expert", label, self._cooldown, failures, sanitize(cause))

    def record_success(self, label: str) -> None:
        with self._lock:
            record = self._records.pop(label, None)
        if record is not None and record.failures >= self._threshold:
            log.info("expert '%s' recovered: it answered again", label)

    def failures(self, label: str) -> int:
        """Failures in a row so far (0 after a success)."""
        with self._lock:
            record = self._records.get(label)
            return record.failures if record else 0

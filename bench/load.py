"""A small closed-loop load generator: N client threads, each with one keep-alive connection,
each sending its next request as soon as the previous answer has been read to the end.

The latency of a request is from just before it is written to just after the last byte of the
answer (the whole stream, for streaming requests) has been read, so a proxy that sends its
pieces late is charged for it. An answer counts only if it is 200 and contains every byte
string of `expect` (the last answer piece and, for a stream, its end marker).

A body that holds PLACEHOLDER gets a number no other request of this process used, so every
request carries its own text and a server that caches routing decisions per text still routes
each one.
"""

from __future__ import annotations

import http.client
import itertools
import math
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

_HEADERS = {"Content-Type": "application/json"}
# Where a request body takes its request number.
PLACEHOLDER = "@@N@@"
# next() on a count is atomic under the GIL: client threads share it without a lock.
_numbers = itertools.count(1)


@dataclass(frozen=True)
class Target:
    """One kind of request to one server."""

    base_url: str
    path: str
    body: bytes
    # Byte strings every complete answer contains.
    expect: tuple[bytes, ...]
    # A response header every complete answer carries, as (name, value), or None.
    expect_header: tuple[str, str] | None = None

    def next_body(self) -> bytes:
        """The body with PLACEHOLDER replaced by a fresh request number."""
        marker = PLACEHOLDER.encode()
        return self.body.replace(marker, str(next(_numbers)).encode(), 1) if marker in self.body else self.body


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    elapsed: float = 0.0
    first_error: str = ""

    @property
    def count(self) -> int:
        return len(self.latencies)

    @property
    def per_second(self) -> float:
        return self.count / self.elapsed if self.elapsed else 0.0

    def percentile_ms(self, q: float) -> float:
        return percentile(self.latencies, q) * 1000


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0-100) of `values`; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class BadAnswer(Exception):
    pass


def _connect(base_url: str) -> http.client.HTTPConnection:
    parts = urlsplit(base_url)
    return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=60)


def send_once(conn: http.client.HTTPConnection, target: Target) -> bytes:
    """One request on a kept-alive connection; the whole answer body, or BadAnswer."""
    conn.request("POST", target.path, body=target.next_body(), headers=_HEADERS)
    response = conn.getresponse()
    data = response.read()
    if response.will_close:
        conn.close()
    if response.status != 200:
        raise BadAnswer(f"HTTP {response.status}: {data[:200]!r}")
    if not all(piece in data for piece in target.expect):
        raise BadAnswer(f"incomplete answer: {data[-200:]!r}")
    if target.expect_header is not None:
        name, value = target.expect_header
        if response.getheader(name) != value:
            raise BadAnswer(f"header {name}: {response.getheader(name)!r}, expected {value!r}")
    return data


def run_load(target: Target, *, concurrency: int, max_requests: int, max_seconds: float) -> LoadResult:
    """Send up to `max_requests` requests from `concurrency` threads, stopping after `max_seconds`."""
    result = LoadResult()
    lock = threading.Lock()
    issued = 0
    deadline = time.perf_counter() + max_seconds

    def take_ticket() -> bool:
        nonlocal issued
        with lock:
            if issued >= max_requests or time.perf_counter() >= deadline:
                return False
            issued += 1
            return True

    def record(latency: float | None, error: str = "") -> None:
        with lock:
            if latency is not None:
                result.latencies.append(latency)
            else:
                result.errors += 1
                result.first_error = result.first_error or error

    def client() -> None:
        conn = _connect(target.base_url)
        try:
            while take_ticket():
                started = time.perf_counter()
                try:
                    send_once(conn, target)
                except (OSError, http.client.HTTPException, BadAnswer) as exc:
                    record(None, f"{type(exc).__name__}: {exc}")
                    conn.close()
                    continue
                record(time.perf_counter() - started)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max_seconds + 120)
    result.elapsed = time.perf_counter() - started
    return result

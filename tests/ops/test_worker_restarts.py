"""Workers that die or are reloaded: a killed worker is replaced and serves again; a SIGHUP under
load answers every request, and the old workers stop only once the new ones serve.

The servers use the default embedding router, whose encoder model the gunicorn master loads
before it forks (modules/ops/preload.py): these tests are also what shows a forked worker can encode
and, when retired, exit. How long any of it takes is bench/bench_restart.py's to measure.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import requests

from tests.ops.conftest import OpsServer, StartOps

EMBEDDING_ROUTER = {"router": {"model_path": "use-multilingual"}}
ROUTE_BODY = {"model": "lemoe", "messages": [{"role": "user", "content": "write a python function that sorts a list"}]}
# Liveness bounds, not timings under test: far above what any of this takes.
DEADLINE_SECONDS = 60.0


def eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {DEADLINE_SECONDS:.0f} s: {what}")


def ready(url: str) -> bool:
    try:
        reply = requests.get(url + "/ready", timeout=5)
    except requests.RequestException:
        return False
    return reply.status_code == 200 and reply.json().get("status") == "ready"


def routed_expert(url: str) -> str:
    reply = requests.post(url + "/v1/route", json=ROUTE_BODY, timeout=30)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["expert"])


@dataclass
class RequestLoop:
    """Client threads sending requests one after another, each on a new connection."""

    url: str
    threads: int = 4
    failures: list[str] = field(default_factory=list)
    answered: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _running: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> RequestLoop:
        for i in range(self.threads):
            thread = threading.Thread(target=self._loop, args=(i,), daemon=True)
            thread.start()
            self._running.append(thread)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._running:
            thread.join(timeout=DEADLINE_SECONDS)

    def _loop(self, index: int) -> None:
        n = index
        while not self._stop.is_set():
            n += 1
            problem = self._one(version=n % 2 == 0)
            with self._lock:
                if problem is None:
                    self.answered += 1
                else:
                    self.failures.append(problem)

    def _one(self, version: bool) -> str | None:
        headers = {"Connection": "close"}
        try:
            if version:
                reply = requests.get(self.url + "/api/version", headers=headers, timeout=DEADLINE_SECONDS)
                good = reply.status_code == 200 and isinstance(reply.json().get("version"), str)
            else:
                reply = requests.post(self.url + "/v1/route", json=ROUTE_BODY, headers=headers,
                                      timeout=DEADLINE_SECONDS)
                good = reply.status_code == 200 and reply.json().get("expert") == "coder"
        except (requests.RequestException, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None if good else f"{reply.status_code}: {reply.text[:200]}"


def server_output(server: OpsServer) -> str:
    return (server.project / "server.out").read_text(errors="replace")


def test_a_killed_worker_is_replaced_and_the_server_is_ready_again(start_ops: StartOps) -> None:
    server = start_ops(config=EMBEDDING_ROUTER, workers=1)
    assert routed_expert(server.url) == "coder"
    (victim,) = server.worker_pids()

    os.kill(victim, signal.SIGKILL)

    eventually(lambda: bool(server.worker_pids()) and victim not in server.worker_pids(),
               "gunicorn forks a replacement for the killed worker")
    eventually(lambda: ready(server.url), "GET /ready answers 200 from the replacement")
    # The replacement routes with the encoder model it inherited from the master.
    assert routed_expert(server.url) == "coder"


def test_sighup_under_load_answers_every_request_and_retires_old_workers_once_new_ones_serve(
        start_ops: StartOps) -> None:
    server = start_ops(config=EMBEDDING_ROUTER, workers=2)
    master = server.live.process.pid
    old = server.worker_pids()
    assert len(old) == 2
    offset = len(server_output(server))

    with RequestLoop(server.url) as loop:
        time.sleep(0.5)
        os.kill(master, signal.SIGHUP)
        eventually(lambda: not (old & server.worker_pids()) and len(server.worker_pids()) == 2,
                   "the old workers exit and two new ones run")
        time.sleep(0.5)

    assert loop.failures == []
    assert loop.answered > 0
    after = server_output(server)[offset:]
    new = server.worker_pids()
    for pid in new:
        assert f"[{pid}] lemoe.server: LeMoE ready" in after, after[-3000:]
    # Every new worker had loaded its app before any old worker stopped.
    last_ready = max(after.index(f"[{pid}] lemoe.server: LeMoE ready") for pid in new)
    for pid in old:
        exiting = after.index(f"Worker exiting (pid: {pid})")
        assert last_ready < exiting, after[-3000:]
    # The old workers left by themselves: none had to be killed (as one hung at exit would be).
    assert not re.search(r"Worker \(pid:(%s)\) was sent" % "|".join(map(str, old)), after), after[-3000:]
    assert routed_expert(server.url) == "coder"

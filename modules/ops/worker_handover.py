"""gunicorn's arbiter, changed in one place: old workers stop only once their successors serve.

On SIGHUP gunicorn forks new workers and at once sends the old ones SIGTERM. An old worker then
stops accepting while its successor is still loading the app, so for the length of a worker's
boot no process accepts a connection (1.1 s with the default configuration on a quiet 2-core
machine, 4 to 13 s under load: bench/README.md, issue 13). Here the retirement waits until the
workers that stay serve.

"Serves" is read from gunicorn's own heartbeat: each worker has a file whose modification time
it sets (`notify`) from its serving loop only, after the app is loaded and its listeners are
started. A time other than the one the file had when the worker was forked means "accepting".

The wait is in `manage_workers`, which gunicorn calls after forking the new workers of a reload
and which retires the oldest workers whenever there are more than configured (a reload, TTOU).
While it waits the master handles no signals, so it is bounded: after READY_WAIT_SECONDS a
successor that still does not serve no longer holds the old workers back. A successor that dies
meanwhile is reaped as usual (a boot failure still halts the server, as gunicorn does).
"""

from __future__ import annotations

import time
from typing import Any

from gunicorn.arbiter import Arbiter  # type: ignore[import-untyped]

READY_WAIT_SECONDS = 30.0
_POLL_SECONDS = 0.02


class HandoverArbiter(Arbiter):  # type: ignore[misc]
    def __init__(self, app: Any) -> None:
        # The heartbeat file's time when each worker was forked, by pid.
        self._forked_stamps: dict[int, float] = {}
        super().__init__(app)

    def spawn_worker(self) -> int:
        # Returns in the master only: the child leaves through sys.exit. The stamp is read right
        # after the fork, long before the child can have loaded the app and beat.
        pid: int = super().spawn_worker()
        worker = self.WORKERS.get(pid)
        if worker is not None:
            self._forked_stamps[pid] = _heartbeat(worker)
        return pid

    def manage_workers(self) -> None:
        if len(self.WORKERS) > self.num_workers:
            self._wait_until_successors_serve()
        super().manage_workers()

    def serving(self, pid: int, worker: Any) -> bool:
        """Whether the worker has beaten since it was forked (its app is loaded, it accepts)."""
        forked = self._forked_stamps.get(pid)
        return forked is None or _heartbeat(worker) != forked

    def _wait_until_successors_serve(self) -> None:
        deadline = time.monotonic() + min(READY_WAIT_SECONDS, float(self.timeout or READY_WAIT_SECONDS))
        while True:
            self._forked_stamps = {pid: s for pid, s in self._forked_stamps.items() if pid in self.WORKERS}
            # The ones gunicorn keeps: the youngest `num_workers`.
            staying = sorted(self.WORKERS.items(), key=lambda item: item[1].age)[-self.num_workers:]
            waiting = [pid for pid, worker in staying if not self.serving(pid, worker)]
            if not waiting:
                if staying:
                    self.log.info("workers %s serve; retiring the older ones", ", ".join(str(p) for p, _ in staying))
                return
            if time.monotonic() >= deadline:
                self.log.warning("workers %s still do not serve after %.0f s; retiring the older ones anyway",
                                 ", ".join(map(str, waiting)), READY_WAIT_SECONDS)
                return
            # A successor that died leaves WORKERS here, and the next round stops waiting for it.
            self.reap_workers()
            time.sleep(_POLL_SECONDS)


def _heartbeat(worker: Any) -> float:
    try:
        return float(worker.tmp.last_update())
    except (OSError, ValueError):  # the file is closed: the worker is gone
        return -1.0
